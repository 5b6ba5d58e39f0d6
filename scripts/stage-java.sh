#!/usr/bin/env bash
# Stages the Java classpaths Tidemark's integration needs into .stage/java/
# (idempotent: a classpath is fetched again only when its pom changed):
#   flink-job-server  Beam 2.62.0 Flink 1.19 job server + Kafka IO and GCP IO
#                     (Pub/Sub) expansion, with Tidemark's own Java classes
#                     (java/src, built into lib/tidemark-java.jar)
#   flink-job-server-jar  the same shaded into the jar --runner FlinkRunner runs
#   flink-cluster     Flink 1.19 session cluster (JobManager, TaskManager)
#   kafka-broker      Apache Kafka 4.1.0 (KRaft)
# Poms: scripts/maven/NAME.xml. Jars come from Maven Central through mvn.
# A classpath is staged again when its pom (or, for the job server, java/src) changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STAGE=${TIDEMARK_STAGE:-$ROOT/.stage}
MVN=${MVN:-mvn}

# mvn NAME ARGS...: runs Maven on scripts/maven/NAME.xml, logging to
# .stage/logs/stage-NAME.log; mvn writes target/ next to the pom, removed after.
mvn_pom() {
  local name=$1 log=$STAGE/logs/stage-$1.log
  shift
  mkdir -p "$STAGE/logs"
  if ! "$MVN" -B -q -f "$ROOT/scripts/maven/$name.xml" "$@" > "$log" 2>&1; then
    rm -rf "$ROOT/scripts/maven/target"
    echo "stage-java: mvn failed for $name; see $log" >&2
    tail -20 "$log" >&2
    return 1
  fi
  rm -rf "$ROOT/scripts/maven/target"
}

# fresh STAMP FILE...: whether STAMP holds the checksum of the FILEs (and
# prints that checksum, for the caller to store once it has staged).
fresh() {
  local stamp=$1 sum
  shift
  sum=$(cat "$@" | sha256sum | cut -d' ' -f1)
  echo "$sum"
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]
}

# The files a classpath is built from: its pom and, for the job server's
# (which holds Tidemark's own classes), the Java sources and their pom.
inputs() {
  echo "$ROOT/scripts/maven/$1.xml"
  if [ "$1" = flink-job-server ] || [ "$1" = flink-job-server-jar ]; then
    echo "$ROOT/scripts/maven/tidemark-java.xml"
    find "$ROOT/java/src" -type f | LC_ALL=C sort
  fi
}

stage() {
  local name=$1 dir=$STAGE/java/$1 sum
  local -a files
  mapfile -t files < <(inputs "$name")
  if sum=$(fresh "$dir/.staged" "${files[@]}") && [ -d "$dir/lib" ]; then
    return 0
  fi
  echo "stage-java: fetching $name classpath (mvn dependency:copy-dependencies)" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  mvn_pom "$name" dependency:copy-dependencies -DoutputDirectory="$dir/lib" -DincludeScope=runtime
  if [ "$name" = flink-job-server ]; then
    mvn_pom tidemark-java package -DbuildDir="$dir/build"
    mv "$dir/build/tidemark-java.jar" "$dir/lib/"
    rm -rf "$dir/build"
  fi
  echo "$sum" > "$dir/.staged"
  echo "stage-java: $name: $(ls "$dir/lib" | wc -l) jars in $dir/lib" >&2
}

# Beam's FlinkRunner launches the job server as one executable jar and looks for
# it in its jar cache before downloading it: shade the staged classpath into it.
BEAM_JAR_CACHE=${BEAM_JAR_CACHE:-$HOME/.apache_beam/cache/jars}
JOB_SERVER_JAR=$BEAM_JAR_CACHE/beam-runners-flink-1.19-job-server-2.62.0.jar
job_server_jar() {
  local stamp=$STAGE/java/flink-job-server-jar.staged sum
  local -a files
  mapfile -t files < <(inputs flink-job-server-jar; inputs flink-job-server)
  if sum=$(fresh "$stamp" "${files[@]}") &&
      [ -f "$JOB_SERVER_JAR" ]; then
    return 0
  fi
  echo "stage-java: shading the Flink job server jar for --runner FlinkRunner" >&2
  mkdir -p "$BEAM_JAR_CACHE"
  mvn_pom flink-job-server-jar package -Djar="$JOB_SERVER_JAR.tmp" || { rm -f "$JOB_SERVER_JAR.tmp"; return 1; }
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
