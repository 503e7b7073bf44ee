# Sourced by the scripts/ensure-*.sh and scripts/test-web.sh: installs Debian/Ubuntu packages the
# test command needs, as root, or says what to install and fails.
#
# apt_install WHO WHY PACKAGE...
#   WHO: the script's name for its messages; WHY: what is missing.
apt_install() {
  local who="$1" why="$2"
  shift 2
  if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "$who: $why; installing $*" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null
  else
    echo "$who: $why." >&2
    echo "On Debian/Ubuntu as root: apt-get install -y $*" >&2
    exit 1
  fi
}
