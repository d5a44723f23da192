#!/bin/sh
# mbt-entrypoint ROLE [ARGS...]
#   node        -> mbt-node ARGS          (serve branches)
#   aggregator  -> mbt-aggregator ARGS    (the gateway)
#   --help      -> this text
#   anything else runs as given, e.g. `mbt verify /artifacts --trusted-key /keys/trusted.pem`.
# `exec` keeps the server as PID 1, so SIGTERM reaches it and a node drains before exiting.
set -eu
usage() {
    echo "usage: ROLE [ARGS...]; ROLE is node (mbt-node), aggregator (mbt-aggregator)," \
        "or a command such as mbt" >&2
}
if [ "$#" -eq 0 ]; then
    usage
    exit 2
fi
role=$1
shift
case "$role" in
    node) exec mbt-node "$@" ;;
    aggregator) exec mbt-aggregator "$@" ;;
    -h | --help) usage; exit 0 ;;
    *) exec "$role" "$@" ;;
esac
