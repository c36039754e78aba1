#!/bin/sh
# Install Debian's Chromium for the console's browser tests when it is missing.
# Playwright drives /usr/bin/chromium (its own browser downloads are not used).
# Without root it only says why the browser tests will be skipped.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-chromium: /usr/bin/chromium is missing and this user is not root;" \
        "install it with 'apt-get install chromium' to run the browser tests" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
