# Shared by scripts/build-static-*: sourced, not run. Builds of Debian
# source packages as static PIEs against Debian's musl, with gcc and a
# specs file instead of musl-gcc (whose wrapper links static executables,
# not static PIEs).
#
#   musl_static_setup NAME [PACKAGE...]   installs what is missing (and
#       PACKAGE...), makes $work (removed at exit), a private apt
#       configuration of the host's Debian release's deb-src (the host's
#       sources are not changed) in "${apt[@]}", $work/musl.specs and $cc.
#   musl_source PACKAGE=VERSION...        fetches the source packages
#       (apt checks them against the archive's signed index) and unpacks
#       each into $work/PACKAGE.

musl_static_setup() {
  local name=$1
  shift
  local need=(dpkg-dev gcc make musl-tools "$@") missing=() p
  for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  work=$(mktemp -d "/tmp/nifty-$name.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  local codename
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  mkdir -p "$work/apt/parts" "$work/apt/lists/partial"
  cat > "$work/apt/parts/src.sources" <<SOURCES
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: $codename-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  apt=(apt-get -qq -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/apt/parts"
    -o "Dir::State::Lists=$work/apt/lists" -o "APT::Sandbox::User=root")
  "${apt[@]}" update
  # gcc with musl's headers and start files, linking static PIEs only;
  # partial links (-r) stay partial.
  local lib inc
  lib=$(dirname "$(dpkg -L musl-dev | grep '/rcrt1\.o$')")
  inc=$(dirname "$(dpkg -L musl-dev | grep '/include/[^/]*/stdio\.h$')")
  {
    echo "%rename cpp_options old_cpp_options"
    echo "*cpp_options:"
    echo "-nostdinc -isystem $inc -isystem include%s %(old_cpp_options)"
    echo
    echo "*cc1:"
    echo "%(cc1_cpu) -nostdinc -isystem $inc -isystem include%s"
    echo
    echo "*link_libgcc:"
    echo "-L$lib -L .%s"
    echo
    echo "*libgcc:"
    echo "libgcc.a%s %:if-exists(libgcc_eh.a%s)"
    echo
    echo "*startfile:"
    echo "%{!r:$lib/rcrt1.o $lib/crti.o crtbeginS.o%s}"
    echo
    echo "*endfile:"
    echo "%{!r:crtendS.o%s $lib/crtn.o}"
    echo
    echo "*link:"
    echo "%{!r:-nostdlib -static -pie --no-dynamic-linker -z text}"
  } > "$work/musl.specs"
  cc="gcc -specs=$work/musl.specs"
}

musl_source() {
  local spec pkg
  (cd "$work" && "${apt[@]}" source --download-only "$@")
  # apt checked the files against the archive's signed index; the .dsc's
  # own signature needs debian-keyring, which is not needed for that.
  for spec in "$@"; do
    pkg=${spec%%=*}
    dpkg-source -x "$(ls "$work/${pkg}"_*.dsc)" "$work/$pkg" >/dev/null 2>"$work/dpkg-source.log" || {
      cat "$work/dpkg-source.log" >&2
      exit 1
    }
  done
}
