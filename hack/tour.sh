#!/usr/bin/env bash
# A tour of csi-rawcow on this machine, as root: installs what is needed, builds the binary,
# starts the CSI driver (with its presentation server embedded) in the background, and runs
# hack/tour, which speaks CSI to it: a base image, three volumes over it, a snapshot, a
# restore, what it all costs on disk; then everything is taken away again.
#
# Whatever happens (failure, Ctrl-C), the script stops the driver and leaves no mount, loop
# device or process behind. The store and the driver's log stay in $ROOT for a look.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=/var/lib/csi-rawcow-tour        # the driver's --root: store/, images/
TOUR=/run/csi-rawcow-tour            # the CSI socket, the server's run dir, staging and targets
RUN_DIR=$TOUR/run                    # the presentation server: FUSE mount, control socket
WORK=$TOUR/work                      # staging and target paths
ENDPOINT=unix://$TOUR/csi.sock
BIN=$ROOT/bin/csi-rawcow
LOG=$ROOT/driver.log
DRIVER_PID=

if [ "$(id -u)" != 0 ]; then
	echo "tour.sh: run it as root (loop devices, FUSE, mounts): sudo bash hack/tour.sh" >&2
	exit 1
fi
export PATH=$PATH:/usr/local/go/bin # sudo's secure_path leaves Go out
if ! command -v go >/dev/null; then
	echo "tour.sh: Go $(sed -n 's/^go //p' go.mod) or newer is needed (https://go.dev/dl/)" >&2
	exit 1
fi

# mountsUnder prints the mount points under $1, deepest first.
mountsUnder() {
	awk -v p="$1/" 'index($2"/", p) == 1 { print $2 }' /proc/self/mounts | sort -r
}

# loopsUnder prints the loop devices whose backing file lies under $1.
loopsUnder() {
	local f
	for f in /sys/block/loop*/loop/backing_file; do
		[ -e "$f" ] || continue
		case "$(cat "$f" 2>/dev/null)" in
		"$1"/*) f=${f#/sys/block/}; echo "/dev/${f%%/*}" ;;
		esac
	done
}

# cleanup takes away whatever the tour left: mounts of volumes, the driver, loop devices,
# the FUSE mount. It runs at every exit and may run twice.
cleanup() {
	local status=$? m dev i
	trap - EXIT INT TERM
	for m in $(mountsUnder "$WORK"); do umount "$m" || umount -l "$m" || true; done
	if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
		kill -TERM "$DRIVER_PID"
		for i in $(seq 100); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 0.1; done
		if kill -0 "$DRIVER_PID" 2>/dev/null; then
			echo "tour.sh: the driver did not stop in 10 s; killing it" >&2
			kill -KILL "$DRIVER_PID" || true
		fi
		wait "$DRIVER_PID" 2>/dev/null || true
	fi
	DRIVER_PID=
	for dev in $(loopsUnder "$RUN_DIR"); do losetup -d "$dev" || true; done
	for m in $(mountsUnder "$TOUR"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
	local left
	left="$(mountsUnder "$TOUR")$(loopsUnder "$RUN_DIR")"
	if [ -n "$left" ]; then
		echo "tour.sh: still there after cleanup: $left" >&2
		status=1
	fi
	if [ "$status" != 0 ] && [ -s "$LOG" ]; then
		echo "--- the last lines of the driver's log ($LOG):" >&2
		tail -n 20 "$LOG" >&2
	fi
	return "$status"
}
trap 'cleanup; exit $?' EXIT
trap 'exit 130' INT TERM

start=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - start) / 1000000 )) ms"; }

echo "== csi-rawcow tour =="
echo "-- installing what is needed (hack/deps.sh)"
bash hack/deps.sh

version=$(git describe --always --dirty 2>/dev/null || echo unknown)
echo "-- building $BIN (version $version)"
mkdir -p "$(dirname "$BIN")"
: >"$LOG" # a failure below must not show an earlier run's log
go build -ldflags "-X main.version=$version" -o "$BIN" ./cmd/csi-rawcow
go build -o /dev/null ./hack/tour # compiled here, so that the tour's own timings are not

# A clean start: whatever an earlier, interrupted tour left behind goes first.
cleanup || true
trap 'cleanup; exit $?' EXIT
trap 'exit 130' INT TERM
rm -rf "$ROOT/store" "$ROOT/images" "$WORK"
mkdir -p "$TOUR" "$WORK"

echo "-- starting the driver: $BIN driver ... (log: $LOG)"
"$BIN" driver --endpoint "$ENDPOINT" --nodeid tour-node --root "$ROOT" --run-dir "$RUN_DIR" \
	--server embedded >"$LOG" 2>&1 &
DRIVER_PID=$!
started=$(date +%s%N)
for i in $(seq 100); do
	[ -S "$TOUR/csi.sock" ] && break
	kill -0 "$DRIVER_PID" 2>/dev/null || { echo "tour.sh: the driver exited" >&2; exit 1; }
	sleep 0.1
done
echo "   driver pid $DRIVER_PID, listening after $(( ($(date +%s%N) - started) / 1000000 )) ms"

go run ./hack/tour --endpoint "$ENDPOINT" --bin "$BIN" --root "$ROOT" --work "$WORK"

echo
echo "-- stopping the driver"
cleanup
trap - EXIT
echo "   no mount, loop device or process of the tour is left"
cat <<EOF

Where things are:
  binary          $BIN (version $("$BIN" version))
  driver log      $LOG
  store, images   $ROOT/store, $ROOT/images (empty again)
  sockets, mounts $TOUR: csi.sock, run/ (the server's FUSE mount and control socket), work/ (staging, targets)
  the tour        hack/tour/main.go (CSI over gRPC), hack/tour.sh (this script)
Remove it all with: rm -rf $ROOT $TOUR
The tour took $(elapsed).
EOF
