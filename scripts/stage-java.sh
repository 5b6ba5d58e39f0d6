#!/usr/bin/env bash
# Stages the Java classpaths Tidemark's integration needs into .stage/java/
# (idempotent: a classpath is fetched again only when its pom changed):
#   flink-job-server  Beam 2.62.0 Flink 1.19 job server + Kafka IO expansion
#   flink-job-server-jar  the same shaded into the jar --runner FlinkRunner runs
#   flink-cluster     Flink 1.19 session cluster (JobManager, TaskManager)
#   kafka-broker      Apache Kafka 4.1.0 (KRaft)
# Poms: scripts/maven/NAME.xml. Jars come from Maven Central through mvn.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STAGE=${TIDEMARK_STAGE:-$ROOT/.stage}
MVN=${MVN:-mvn}

stage() {
  local name=$1 pom=$ROOT/scripts/maven/$1.xml
  local dir=$STAGE/java/$name stamp=$STAGE/java/$name/.staged
  local sum
  sum=$(sha256sum "$pom" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ] && [ -d "$dir/lib" ]; then
    return 0
  fi
  echo "stage-java: fetching $name classpath (mvn dependency:copy-dependencies)" >&2
  rm -rf "$dir"
  mkdir -p "$dir" "$STAGE/logs"
  if ! "$MVN" -B -q -f "$pom" dependency:copy-dependencies \
      -DoutputDirectory="$dir/lib" -DincludeScope=runtime \
      > "$STAGE/logs/stage-$name.log" 2>&1; then
    echo "stage-java: mvn failed for $name; see $STAGE/logs/stage-$name.log" >&2
    tail -20 "$STAGE/logs/stage-$name.log" >&2
    return 1
  fi
  # mvn writes target/ next to the pom; keep the source tree clean.
  rm -rf "$ROOT/scripts/maven/target"
  echo "$sum" > "$stamp"
  echo "stage-java: $name: $(ls "$dir/lib" | wc -l) jars in $dir/lib" >&2
}

# Beam's FlinkRunner launches the job server as one executable jar and looks for
# it in its jar cache before downloading it: shade the staged classpath into it.
BEAM_JAR_CACHE=${BEAM_JAR_CACHE:-$HOME/.apache_beam/cache/jars}
JOB_SERVER_JAR=$BEAM_JAR_CACHE/beam-runners-flink-1.19-job-server-2.62.0.jar
job_server_jar() {
  local pom=$ROOT/scripts/maven/flink-job-server-jar.xml stamp=$STAGE/java/flink-job-server-jar.staged
  local sum
  sum=$(cat "$pom" "$ROOT/scripts/maven/flink-job-server.xml" | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ] && [ -f "$JOB_SERVER_JAR" ]; then
    return 0
  fi
  echo "stage-java: shading the Flink job server jar for --runner FlinkRunner" >&2
  mkdir -p "$BEAM_JAR_CACHE" "$STAGE/logs"
  if ! "$MVN" -B -q -f "$pom" package -Djar="$JOB_SERVER_JAR.tmp" \
      > "$STAGE/logs/stage-flink-job-server-jar.log" 2>&1; then
    echo "stage-java: mvn failed; see $STAGE/logs/stage-flink-job-server-jar.log" >&2
    tail -20 "$STAGE/logs/stage-flink-job-server-jar.log" >&2
    rm -rf "$ROOT/scripts/maven/target" "$JOB_SERVER_JAR.tmp"
    return 1
  fi
  rm -rf "$ROOT/scripts/maven/target"
  mv "$JOB_SERVER_JAR.tmp" "$JOB_SERVER_JAR"
  echo "$sum" > "$stamp"
  echo "stage-java: $JOB_SERVER_JAR" >&2
}

if [ $# -eq 0 ]; then
  set -- flink-job-server flink-job-server-jar flink-cluster kafka-broker
fi
for name in "$@"; do
  if [ "$name" = flink-job-server-jar ]; then
    job_server_jar
  else
    stage "$name"
  fi
done
