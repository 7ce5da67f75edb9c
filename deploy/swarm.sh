#!/usr/bin/env bash
# make stack-up / make stack-down: deploy/stack.yaml on Docker Swarm.
#   deploy/swarm.sh up   NAME   join or create a one-node swarm, make the token, deploy, wait
#   deploy/swarm.sh down NAME   remove the stack (services, network, secret, configs) and wait
# The images wirekit-{echo,cmdexec,udp,prometheus}:$IMAGE_TAG must exist (make stack-up builds
# them). CMDEXEC_TOKEN_FILE (default deploy/secrets/cmdexec_token, made here if missing, mode
# 0600) holds the token clients use; write a new one there and run `up` again to rotate it.
# The swarm is left in place: `docker swarm leave --force`.
set -euo pipefail
cd "$(dirname "$0")"
action=${1:?usage: swarm.sh up|down NAME}
name=${2:?usage: swarm.sh up|down NAME}
: "${IMAGE_TAG:?IMAGE_TAG is required}"
export IMAGE_TAG
export CMDEXEC_TOKEN_FILE="${CMDEXEC_TOKEN_FILE:-$PWD/secrets/cmdexec_token}"
WAIT_S=${WAIT_S:-300}

# Waits up to WAIT_S seconds for "$@" to succeed; says what it waited for otherwise.
wait_for() {
  local what=$1
  shift
  for _ in $(seq 1 "$WAIT_S"); do
    "$@" && return 0
    sleep 1
  done
  echo "swarm.sh: gave up after ${WAIT_S}s waiting for $what" >&2
  return 1
}

converged() {
  # Every service of the stack runs as many replicas as it asks for, and none is being updated.
  local lines ids
  lines=$(docker stack services "$name" --format '{{.Replicas}}') || return 1
  [ -n "$lines" ] || return 1
  grep -qvE '^([0-9]+)/\1( |$)' <<<"$lines" && return 1
  ids=$(docker stack services "$name" -q) || return 1
  # shellcheck disable=SC2086
  ! docker service inspect $ids --format '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' \
    | grep -qE 'updating|rollback_started'
}

gone() {
  # The stack's containers (they drain before they exit) and its network no longer exist.
  [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$name")" ] \
    && ! docker network inspect "${name}_net" >/dev/null 2>&1
}

case "$action" in
  up)
    if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
      docker swarm init --advertise-addr "${ADVERTISE_ADDR:-127.0.0.1}" >/dev/null
      echo "swarm.sh: created a one-node swarm (leave it with: docker swarm leave --force)"
    fi
    if [ ! -s "$CMDEXEC_TOKEN_FILE" ]; then
      mkdir -p "$(dirname "$CMDEXEC_TOKEN_FILE")"
      (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$CMDEXEC_TOKEN_FILE")
      echo "swarm.sh: wrote a new cmdexec token to $CMDEXEC_TOKEN_FILE"
    fi
    export SWARM_STACK="$name"
    CMDEXEC_TOKEN_VERSION=$(stat -c %Y "$CMDEXEC_TOKEN_FILE")
    PROMETHEUS_CONFIG_VERSION=$(sha256sum prometheus/swarm.yml | cut -c1-12)
    PROMETHEUS_RULES_VERSION=$(sha256sum prometheus/rules/wirekit.yml | cut -c1-12)
    export CMDEXEC_TOKEN_VERSION PROMETHEUS_CONFIG_VERSION PROMETHEUS_RULES_VERSION
    docker stack deploy --resolve-image never -c stack.yaml "$name"
    sleep 2  # a changed service enters "updating" a moment after the deploy returns
    wait_for "every replica of $name running" converged
    # Secrets and configs of earlier deploys (a rotated token, an edited config), once no task
    # uses them: removal fails for one still in use, which is then left for the next deploy.
    current=" ${name}_cmdexec_token_$CMDEXEC_TOKEN_VERSION ${name}_prometheus_$PROMETHEUS_CONFIG_VERSION ${name}_rules_$PROMETHEUS_RULES_VERSION "
    for kind in secret config; do
      docker "$kind" ls --filter "label=com.docker.stack.namespace=$name" --format '{{.Name}}' \
        | while read -r old; do
            [[ "$current" == *" $old "* ]] || docker "$kind" rm "$old" >/dev/null 2>&1 || true
          done
    done
    docker stack services "$name"
    ;;
  down)
    docker stack rm "$name"
    wait_for "$name's containers and network to be removed" gone
    ;;
  *)
    echo "usage: swarm.sh up|down NAME" >&2
    exit 2
    ;;
esac
