#!/bin/sh
# Makes the docker secrets of docker-compose.yml under ./secrets/ (mode 600), with random
# passwords; keeps any file that already exists. Prints the Flower password once.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
random() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
write() { [ -s "secrets/$1" ] || printf '%s\n' "$2" > "secrets/$1"; }
write redis_password "$(random)"
write postgres_password "$(random)"
write flower_password "$(random)"
write broker_url "redis://:$(cat secrets/redis_password)@redis:6379/0"
write database_url "postgresql://imgpipe:$(cat secrets/postgres_password)@postgres:5432/imgpipe"
echo "secrets in $(pwd)/secrets; Flower: user admin, password $(cat secrets/flower_password)"
