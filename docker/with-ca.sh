#!/bin/sh
# Build-time only (Dockerfile): run a command trusting the CA bundle given as the BuildKit
# secret "ca" (docker build --secret id=ca,src=/path/to/ca-bundle.crt), for sites whose HTTPS
# goes through an intercepting proxy. Pass a whole bundle (the host's trusted CAs): it replaces
# the default for pip, requests and curl. Without the secret the command runs unchanged.
ca=/run/secrets/ca
if [ -s "$ca" ]; then
  export PIP_CERT="$ca" SSL_CERT_FILE="$ca" REQUESTS_CA_BUNDLE="$ca" CURL_CA_BUNDLE="$ca"
fi
exec "$@"
