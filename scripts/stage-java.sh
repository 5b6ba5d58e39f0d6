#!/usr/bin/env bash
# Stages the Java classpaths Tidemark's integration needs into .stage/java/
# (idempotent: a classpath is fetched again only when its pom changed):
#   flink-job-server  Beam 2.62.0 Flink 1.19 job server + Kafka IO expansion
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

if [ $# -eq 0 ]; then
  set -- flink-job-server flink-cluster kafka-broker
fi
for name in "$@"; do
  stage "$name"
done
