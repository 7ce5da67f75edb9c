#!/usr/bin/env bash
# The cmdexec credentials of the compose and swarm stacks (make up, make stack-up):
#   deploy/cmdexec-credentials.sh TOKEN_FILE POLICY_FILE
# Makes TOKEN_FILE (a new 256-bit token, mode 0600: what clients use) when it is missing, and
# POLICY_FILE (identity "admin" with that token's hash and the server's default rights, mode
# 0644: it holds hashes only) when it is missing. Existing files are never changed: to rotate,
# edit the policy (wirekit-cmdexec token new / token hash) and deploy again.
set -euo pipefail
token_file=${1:?usage: cmdexec-credentials.sh TOKEN_FILE POLICY_FILE}
policy_file=${2:?usage: cmdexec-credentials.sh TOKEN_FILE POLICY_FILE}
if [ ! -s "$token_file" ]; then
  mkdir -p "$(dirname "$token_file")"
  (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$token_file")
  echo "cmdexec-credentials: wrote a new cmdexec token to $token_file"
fi
if [ ! -s "$policy_file" ]; then
  mkdir -p "$(dirname "$policy_file")"
  hash=$(python3 -c 'import hashlib, sys; t = open(sys.argv[1]).read().strip(); print("sha256:" + hashlib.sha256(t.encode()).hexdigest())' "$token_file")
  cat >"$policy_file" <<POLICY
# cmdexec identities (docs/cmdexec.md: "Identities, the policy file, reload and audit").
# Made by deploy/cmdexec-credentials.sh for the token in $(basename "$token_file").
version: 1
identities:
  admin:
    tokens: ["$hash"]
POLICY
  chmod 0644 "$policy_file"
  echo "cmdexec-credentials: wrote $policy_file (identity admin, the token's hash)"
fi
