#!/usr/bin/env bash
# A new user's first command: install what is missing, build everything (native runtime, JVM
# artifacts, the CLI), then generate text with the bundled model through the Java CLI.
#   bash ci/quickstart.sh ["prompt text"]
# The bundled model (models/tiny-dbrx-cl100k) has the real DBRX tokenizer and chat template but
# RANDOM weights: the text it generates is gibberish. Point --model at a real DBRX checkpoint for words.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
prompt=${1:-"What is a mixture of experts?"}

bash ci/deps.sh >&2
. ci/cuda-env.sh
jar=samples/cli/target/dbrx4j-cli-0.1.0-SNAPSHOT-all.jar
if [ ! -f "$jar" ] || [ -n "$(find cpp sdk java-bindings samples/cli -newer "$jar" -type f -print -quit)" ]; then
  echo "== building (mvn install -DskipTests; a few minutes the first time)" >&2
  mvn -B -q install -DskipTests -Ddbrx.cuda.skip=true >&2
fi
echo "== generating with models/tiny-dbrx-cl100k (random weights: expect gibberish)" >&2
exec java -jar "$jar" generate --model models/tiny-dbrx-cl100k --chat --prompt "$prompt" --max-tokens 32 --temperature 0.8 --seed 7
