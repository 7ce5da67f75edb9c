#!/usr/bin/env bash
# make stack-up / make stack-down: deploy/stack.yaml on Docker Swarm.
#   deploy/swarm.sh up   NAME   join or create a one-node swarm, make the token, deploy, wait
#   deploy/swarm.sh down NAME   remove the stack (services, network, configs) and wait
# The images wirekit-{echo,cmdexec,udp,probe,prometheus}:$IMAGE_TAG must exist (make stack-up builds
# them). CMDEXEC_TOKEN_FILE (default deploy/secrets/cmdexec_token) holds the token clients
# use and CMDEXEC_POLICY_FILE (default deploy/secrets/cmdexec-policy.yaml) the identities;
# both are made by cmdexec-credentials.sh when missing. Edit the policy and run `up` again to
# change rights or rotate a token. The swarm is left in place: `docker swarm leave --force`.
set -euo pipefail
cd "$(dirname "$0")"
action=${1:?usage: swarm.sh up|down NAME}
name=${2:?usage: swarm.sh up|down NAME}
: "${IMAGE_TAG:?IMAGE_TAG is required}"
export IMAGE_TAG
export CMDEXEC_TOKEN_FILE="${CMDEXEC_TOKEN_FILE:-$PWD/secrets/cmdexec_token}"
export CMDEXEC_POLICY_FILE="${CMDEXEC_POLICY_FILE:-$PWD/secrets/cmdexec-policy.yaml}"
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
    bash cmdexec-credentials.sh "$CMDEXEC_TOKEN_FILE" "$CMDEXEC_POLICY_FILE"
    export SWARM_STACK="$name"
    CMDEXEC_POLICY_VERSION=$(sha256sum "$CMDEXEC_POLICY_FILE" | cut -c1-12)
    PROMETHEUS_CONFIG_VERSION=$(sha256sum prometheus/swarm.yml | cut -c1-12)
    PROMETHEUS_RULES_VERSION=$(sha256sum prometheus/rules/wirekit.yml | cut -c1-12)
    export CMDEXEC_POLICY_VERSION PROMETHEUS_CONFIG_VERSION PROMETHEUS_RULES_VERSION
    docker stack deploy --resolve-image never -c stack.yaml "$name"
    sleep 2  # a changed service enters "updating" a moment after the deploy returns
    wait_for "every replica of $name running" converged
    # Configs (and secrets) of earlier deploys (an edited policy or config), once no task
    # uses them: removal fails for one still in use, which is then left for the next deploy.
    current=" ${name}_cmdexec_policy_$CMDEXEC_POLICY_VERSION ${name}_prometheus_$PROMETHEUS_CONFIG_VERSION ${name}_rules_$PROMETHEUS_RULES_VERSION "
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
