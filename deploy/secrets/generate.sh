#!/bin/sh
# Makes the secrets deploy/compose.yaml mounts: the calibrator's bearer token, the heads key that signs head
# announcements (calibrator and workers share it) and Grafana's admin password. Existing files are kept, so
# running it again changes nothing; delete a file to rotate it (then restart the services that read it).
#
#   sh deploy/secrets/generate.sh [DIR]        # default: the folder of this script
#
# 32 random bytes each, hex. The folder is 0700 (other users of the host cannot read it); the files are 0644
# because Compose bind-mounts file secrets as they are and the containers run as other users (cff-inspect as
# uid 10001, Grafana as 472). Never commit them (deploy/secrets/.gitignore) — a real cluster takes them from its
# secret store (deploy/k8s/secret.example.yaml, systemd LoadCredential=).
set -eu
dir="${1:-$(dirname "$0")}"
mkdir -p "$dir"
chmod 700 "$dir"
for name in calibrator_token heads_key grafana_admin_password; do
  file="$dir/$name"
  if [ -s "$file" ]; then
    echo "keeping $file"
    continue
  fi
  (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$file.tmp")
  chmod 644 "$file.tmp"
  mv "$file.tmp" "$file"
  echo "wrote $file"
done
