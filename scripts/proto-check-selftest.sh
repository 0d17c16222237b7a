#!/usr/bin/env bash
# Proves that scripts/proto-check.sh catches what it is there to catch: each
# mutation below makes one edit to a temporary copy of proto/ and the check
# must fail saying the expected buf rule; an additive change must pass. A
# mutation whose text is no longer in the file fails the self-test too.
# Then, in a temporary git repository, a branch that removes a field main
# added after the last release must fail the branch check (the released image
# does not know that field, so only the merge-base comparison can see it).
#
#   scripts/proto-check-selftest.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# outcome | file (under proto/normserve/v1) | text | replacement | expected in the output
# (buf's message for the rule: FIELD_NO_DELETE, FIELD_SAME_TYPE, ENUM_VALUE_SAME_NAME,
# ENUM_VALUE_NO_DELETE, RPC_NO_DELETE, FIELD_SAME_NAME, and lint's MESSAGE_PASCAL_CASE)
mutations=$(cat <<'EOF_MUTATIONS'
fail|tensor.proto|  repeated int64 shape = 2;\n||Previously present field "2" with name "shape" on message "Tensor" was deleted
fail|tensor.proto|  repeated int64 shape = 2;|  repeated int32 shape = 2;|changed type from "int64" to "int32"
fail|tensor.proto|    bytes raw = 3;|    bytes raw = 6;|Previously present field "3" with name "raw" on message "Tensor" was deleted
fail|tensor.proto|  DATA_TYPE_FLOAT16 = 3;|  DATA_TYPE_HALF = 3;|changed name from "DATA_TYPE_FLOAT16" to "DATA_TYPE_HALF"
fail|tensor.proto|  DATA_TYPE_BFLOAT16 = 4;|  DATA_TYPE_BFLOAT16 = 5;|Previously present enum value "4" on enum "DataType" was deleted
fail|server.proto|  rpc GetServerInfo(GetServerInfoRequest) returns (GetServerInfoResponse);|  rpc GetServerInformation(GetServerInfoRequest) returns (GetServerInfoResponse);|Previously present RPC "GetServerInfo" on service "ServerService" was deleted
fail|tensor.proto|  repeated int64 shape = 2;|  repeated int64 dims = 2;|changed name from "shape" to "dims"
fail|tensor.proto|syntax = "proto3";|syntax = "proto3";\nmessage tensor_shape { int64 rank = 1; }|Message name "tensor_shape" should be PascalCase
pass|tensor.proto|  repeated int64 shape = 2;|  repeated int64 shape = 2;\n  // Added in a later version: additive, so not a breaking change.\n  string layout = 7;|proto-check: lint and breaking checks passed
EOF_MUTATIONS
)

edit() {  # file text replacement
  python3 - "$@" <<'PY'
import sys
path, old, new = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3].replace("\\n", "\n")
text = open(path).read()
if old not in text:
    sys.exit(f"mutation text not found in {path}: {old!r}")
open(path, "w").write(text.replace(old, new, 1))
PY
}

passed=0
failed=0
while IFS='|' read -r outcome file text replacement expected; do
  [ -n "$outcome" ] || continue
  rm -rf "$work/root" && mkdir -p "$work/root"
  cp -a "$repo/proto" "$work/root/"
  if ! edit "$work/root/proto/normserve/v1/$file" "$text" "$replacement"; then
    echo "selftest: FAIL stale mutation in $file"
    failed=$((failed + 1))
    continue
  fi
  status=0
  output=$(NORMSERVE_PROTO_ROOT="$work/root" "$repo/scripts/proto-check.sh" 2>&1) || status=$?
  if [ "$outcome" = fail ] && [ "$status" -eq 0 ]; then
    echo "selftest: FAIL proto-check accepted a broken $file ($expected)"
    failed=$((failed + 1))
  elif [ "$outcome" = pass ] && [ "$status" -ne 0 ]; then
    echo "selftest: FAIL proto-check refused an additive change to $file:"
    tail -n 5 <<<"$output" | sed 's/^/    /'
    failed=$((failed + 1))
  elif ! grep -qF -- "$expected" <<<"$output"; then
    echo "selftest: FAIL proto-check on $file did not say '$expected':"
    tail -n 5 <<<"$output" | sed 's/^/    /'
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
done <<<"$mutations"

# The branch check, in a repository of its own: main releases the API (the
# baseline), then adds a field; a branch deletes that field again.
git_in() { git -C "$work/git" -c user.name=selftest -c user.email=selftest@localhost -c commit.gpgsign=false "$@"; }
rm -rf "$work/git" && mkdir -p "$work/git"
cp -a "$repo/proto" "$work/git/"
git_in init -q -b main
git_in add proto && git_in commit -q -m release
edit "$work/git/proto/normserve/v1/tensor.proto" "  repeated int64 shape = 2;" "  repeated int64 shape = 2;\n  string layout = 7;"
git_in commit -q -am "main: add Tensor.layout"
git_in checkout -q -b topic
edit "$work/git/proto/normserve/v1/tensor.proto" "  string layout = 7;\n" ""
git_in commit -q -am "topic: drop Tensor.layout"
status=0
output=$(NORMSERVE_PROTO_ROOT="$work/git" NORMSERVE_PROTO_MAIN=main "$repo/scripts/proto-check.sh" 2>&1) || status=$?
if [ "$status" -ne 0 ] && grep -q "failed: branch$" <<<"$output" && grep -qF 'Previously present field "7" with name "layout" on message "Tensor" was deleted' <<<"$output"; then
  passed=$((passed + 1))
else
  echo "selftest: FAIL the branch check did not catch a field main added and a branch removed:"
  tail -n 6 <<<"$output" | sed 's/^/    /'
  failed=$((failed + 1))
fi

echo "proto selftest: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
