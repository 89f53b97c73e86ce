#!/usr/bin/env bash
# bench/fio.sh: the speed of csi-rawcow's block devices, side by side with a plain loop
# device and a qcow2 overlay, in one run (docs/PERFORMANCE.md shows results).
#
#   bench/fio.sh [--quick] [--dir DIR] [--ram] [--rounds N] [--runtime S] [--presentation P]
#                [--fuse-transport T] [--profile] [--profile-job CONFIG:NAME:RW:BS:IODEPTH]
#                [--only NAMES] [--out FILE]
#
# Run as root. On DIR (default: a fresh directory on the file system of /work, the
# repository's parent) it makes a 4 GiB base image whose first half holds data, and measures
# fio jobs (libaio, direct=1, over the first 1 GiB of each device) on:
#   a     a loop device (direct I/O, 4096-byte sectors) over a plain raw copy of the base
#   b1    csi-rawcow: a volume over the base (depth 1: the top only)
#   b16   csi-rawcow: a clone at depth 16 (15 frozen layers of 1000 scattered 4 KiB writes)
#   b128  csi-rawcow: a clone at depth 128 (127 such layers)
#   c     a qcow2 overlay over the base, exported by qemu-storage-daemon's FUSE export, with a
#         loop device (direct I/O, 4096-byte sectors) on it
#   f     the FUSE floor: a loop device on a 1 GiB file that bench/fusefloor serves from memory
#         with csi-rawcow's mount options (reads answered in place, writes copied once, no
#         engine, no file system): what any FUSE server can reach on this machine
# Write jobs run on a second volume (or overlay) of each configuration, built the same way, so
# that read jobs always see the chain as built, not what earlier write jobs left in the top.
# in interleaved rounds (a f b1 b16 b128 c, again, ...), and prints the medians: IOPS or MiB/s,
# the ratio to (a), and the CPU the serving process used (fusefloor for f, csi-rawcow serve for
# b*, qemu-storage-daemon for c; kernel threads are not counted).
#
#   --quick       3 s per job instead of 10, 2 rounds
#   --rounds N    rounds (default 3: round 1 writes allocate, later rounds overwrite)
#   --runtime S   seconds per job
#   --ram         put DIR's data on an ext4 (xfs with --presentation composed) over a loop
#                 device on /dev/shm (about 10 GiB of memory): both sides at memory speed, so
#                 ratios show software overhead only
#   --profile     perf record the server during a 4 KiB random read (qd32) and a 1 MiB
#                 sequential read on b1, whatever the ratios (otherwise only when random read
#                 is under 0.5 or sequential under 0.9 of a)
#   --profile-job CONFIG:NAME:RW:BS:IODEPTH
#                 profile this job too, e.g. b16:write-1m-qd8:write:1m:8 (repeatable)
#   --presentation merged|composed|auto
#                 how the b* volumes are attached (default merged: the FUSE view; composed
#                 needs xfs or btrfs under DIR)
#   --fuse-transport io-uring|dev-fuse|auto
#                 how the server gets FUSE requests (csi-rawcow serve --fuse-transport;
#                 default auto, the server's default: io-uring where the kernel has it)
#   --only NAMES  run only these jobs and configurations (comma-separated, e.g.
#                 write-1m-qd8,a,f,b1); a is always measured, it is the baseline; only
#                 what the named configurations need is set up (b16 alone: 15 layers, not 127)
#   --out FILE    also write the results (markdown) to FILE
#
# Everything it makes is removed at exit (loop devices, server, qemu-storage-daemon, mounts,
# files). On a file system mounted with -o discard, removing fragmented layers takes a while.
set -euo pipefail

QUICK=0 DIR="" RAM=0 ROUNDS="" RUNTIME="" PROFILE=0 OUT="" PRESENTATION=merged ONLY= TRANSPORT=auto
# CONFIG:name:rw:bs:iodepth of the jobs to profile
PROFILE_JOBS=(b1:randread-4k-qd32:randread:4k:32 b1:read-1m-qd8:read:1m:8)
while [[ $# -gt 0 ]]; do
	case "$1" in
	--quick) QUICK=1 ;;
	--dir) DIR="$2"; shift ;;
	--ram) RAM=1 ;;
	--rounds) ROUNDS="$2"; shift ;;
	--runtime) RUNTIME="$2"; shift ;;
	--presentation) PRESENTATION="$2"; shift ;;
	--fuse-transport) TRANSPORT="$2"; shift ;;
	--profile) PROFILE=1 ;;
	--profile-job) PROFILE=1; PROFILE_JOBS+=("$2"); shift ;;
	--out) OUT="$(realpath -m "$2")"; shift ;;
	--only) ONLY=",$2,"; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "fio.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
	shift
done
if [[ $QUICK == 1 ]]; then
	: "${RUNTIME:=3}" "${ROUNDS:=2}"
fi
: "${RUNTIME:=10}" "${ROUNDS:=3}"

CONFIGS=(a f b1 b16 b128 c)
# name:rw:bs:iodepth
JOBS=(randread-4k-qd1:randread:4k:1 randread-4k-qd32:randread:4k:32 read-1m-qd8:read:1m:8
	randwrite-4k-qd1:randwrite:4k:1 randwrite-4k-qd32:randwrite:4k:32 write-1m-qd8:write:1m:8)
if [[ -n $ONLY ]]; then # keep the named jobs and configurations (a always: the baseline)
	keep=() for_jobs=()
	for cfg in "${CONFIGS[@]}"; do [[ $cfg == a || $ONLY == *",$cfg,"* ]] && keep+=("$cfg"); done
	((${#keep[@]} > 1)) && CONFIGS=("${keep[@]}")
	for spec in "${JOBS[@]}"; do [[ $ONLY == *",${spec%%:*},"* ]] && for_jobs+=("$spec"); done
	((${#for_jobs[@]} > 0)) && JOBS=("${for_jobs[@]}")
fi
measured() { [[ " ${CONFIGS[*]} " == *" $1 "* ]]; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${DIR:=$(cd "$REPO/.." && pwd)}"
[[ $EUID == 0 ]] || { echo "fio.sh: run as root (loop devices, FUSE)" >&2; exit 1; }
for tool in fio losetup qemu-img qemu-storage-daemon go python3 mkfs.ext4; do
	command -v "$tool" >/dev/null || { echo "fio.sh: $tool is missing (Debian: fio, util-linux, qemu-utils, qemu-system-common, golang, python3, e2fsprogs)" >&2; exit 1; }
done

WORK="$(mktemp -d "$DIR/rawcow-fio.XXXXXX")"
LOOPS=() ATTACHED=() SERVER_PID="" QSD_PID="" FLOOR_PID="" RAMDEV="" RAMIMG="" QMNT=""
log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
	set +e
	log "cleaning up"
	for dev in "${LOOPS[@]}"; do losetup -d "$dev" 2>/dev/null; done
	# composed devices outlive their server by design (a restarted server adopts them)
	for name in "${ATTACHED[@]}"; do "$BIN" detach --run-dir "$R" "$name" 2>/dev/null; done
	if [[ -n $SERVER_PID ]]; then
		kill -TERM "$SERVER_PID" 2>/dev/null
		wait "$SERVER_PID" 2>/dev/null
	fi
	for pid in "$QSD_PID" "$FLOOR_PID"; do
		[[ -n $pid ]] || continue
		kill -TERM "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	mountpoint -q "$WORK/floor" 2>/dev/null && umount -l "$WORK/floor"
	for m in "$QMNT-r" "$QMNT-w"; do [[ -n $QMNT ]] && mountpoint -q "$m" && umount "$m"; done
	mountpoint -q "$WORK/run/fuse" 2>/dev/null && umount -l "$WORK/run/fuse"
	local t0=$SECONDS
	if [[ -n $RAMDEV ]]; then
		for _ in 1 2 3 4 5; do umount "$WORK/data" 2>/dev/null && break; sleep 1; done
		mountpoint -q "$WORK/data" && umount -l "$WORK/data" # the loop device goes with it
		losetup -d "$RAMDEV" 2>/dev/null
		rm -f "$RAMIMG"
	fi
	rm -rf "$WORK"
	log "removed $WORK in $((SECONDS - t0)) s"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

DATA="$WORK/data"
mkdir -p "$DATA"
if [[ $RAM == 1 ]]; then
	RAMIMG="$(mktemp /dev/shm/rawcow-fio.XXXXXX)"
	truncate -s 24G "$RAMIMG"
	RAMDEV="$(losetup --find --show --direct-io=on --sector-size 4096 "$RAMIMG")"
	if [[ $PRESENTATION == composed ]]; then
		# composing needs reflink: xfs (reflink is mkfs.xfs's default)
		mkfs.xfs -q -f -b size=4096 -K "$RAMDEV"
		mount -t xfs -o discard "$RAMDEV" "$DATA"
	else
		mkfs.ext4 -q -F -b 4096 -E nodiscard "$RAMDEV"
		mount -t ext4 -o discard "$RAMDEV" "$DATA"
	fi
fi
log "work directory $WORK (data on $(findmnt -no SOURCE,FSTYPE,OPTIONS -T "$DATA" | head -1))"

BIN="$WORK/csi-rawcow"
(cd "$REPO" && go build -o "$BIN" ./cmd/csi-rawcow && go build -o "$WORK/scatter" ./bench/scatter &&
	go build -o "$WORK/fusefloor" ./bench/fusefloor)

# The base: 4 GiB, data in its first half (fio's random buffer content).
BASE="$DATA/base.raw"
truncate -s 4G "$BASE"
fio --name=fill --filename="$BASE" --rw=write --bs=1M --size=2G --ioengine=psync \
	--end_fsync=1 --output=/dev/null
# never a reflink (cp's default on xfs): the baseline is a file of its own, written in place
cp --sparse=always --reflink=never "$BASE" "$DATA/plain.raw"
sync -f "$DATA/plain.raw"
log "base and its raw copy made"

# The store: volume "layers" over the base gets 127 frozen layers of 1000 scattered 4 KiB
# writes in the working set; d1 is a new volume over the base, d16 and d128 clones. Read jobs
# run on dN, write jobs on wN (the same chains): so reads always go through the whole chain,
# never through what earlier write jobs put in the top.
# Only the layers that the measured depths need are made (--only).
S="$DATA/store"
img() { "$BIN" image --store "$S" "$@" >/dev/null; }
DEPTHS=() frozen=0
for d in 1 16 128; do measured "b$d" && DEPTHS+=("$d") && frozen=$((d - 1)); done
img create --base "$BASE" layers
for i in $(seq 1 "$frozen"); do
	"$WORK/scatter" --store "$S" --count 1000 --span $((1 << 30)) --seed "$i" layers
	img snapshot layers "$(printf 'L%03d' "$i")"
done
for v in d w; do
	for d in "${DEPTHS[@]}"; do
		if ((d == 1)); then
			img create --base "$BASE" ${v}1
		else
			img clone "$(printf 'L%03d' $((d - 1)))" "$v$d"
		fi
	done
done
log "store made: $frozen frozen layers; volumes for depths ${DEPTHS[*]}"

# The qcow2 peer: one overlay for reads, one for writes, both exported by one daemon.
if measured c; then
	QMNT="$WORK/qcow2.export"
	QSD_ARGS=()
	for v in r w; do
		qemu-img create -q -f qcow2 -b "$BASE" -F raw "$DATA/overlay-$v.qcow2"
		touch "$QMNT-$v"
		QSD_ARGS+=(--blockdev "driver=file,node-name=f$v,filename=$DATA/overlay-$v.qcow2"
			--blockdev "driver=qcow2,node-name=q$v,file=f$v"
			--export "type=fuse,id=e$v,node-name=q$v,mountpoint=$QMNT-$v,writable=on")
	done
	qemu-storage-daemon "${QSD_ARGS[@]}" >"$WORK/qsd.log" 2>&1 &
	QSD_PID=$!
	for _ in $(seq 100); do mountpoint -q "$QMNT-w" && break; sleep 0.1; done
	mountpoint -q "$QMNT-r" && mountpoint -q "$QMNT-w" ||
		{ cat "$WORK/qsd.log" >&2; echo "fio.sh: qemu-storage-daemon did not export" >&2; exit 1; }
fi

# The FUSE floor.
if measured f; then
	"$WORK/fusefloor" --mount "$WORK/floor" --size $((1 << 30)) >"$WORK/fusefloor.log" 2>&1 &
	FLOOR_PID=$!
	for _ in $(seq 100); do [[ -f $WORK/floor/disk ]] && break; sleep 0.1; done
	[[ -f $WORK/floor/disk ]] || { cat "$WORK/fusefloor.log" >&2; echo "fio.sh: fusefloor did not mount" >&2; exit 1; }
fi

# The server and its devices.
R="$WORK/run"
"$BIN" serve --fuse-transport "$TRANSPORT" --store "$S" --run-dir "$R" >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do [[ -S $R/control.sock ]] && break; sleep 0.1; done
[[ -S $R/control.sock ]] || { cat "$WORK/serve.log" >&2; echo "fio.sh: the server did not start" >&2; exit 1; }
SERVED_OVER="$(grep -o 'transport="[^"]*"' "$WORK/serve.log" | head -1 | cut -d'"' -f2)"

# DEV: the device of each configuration for read jobs; WDEV: for write jobs.
declare -A DEV WDEV PID
attach_loop() { # ARRAY CONFIG FILE: a loop device with direct I/O and 4096-byte sectors
	local dev
	dev="$(losetup --find --show --direct-io=on --sector-size 4096 "$3")"
	LOOPS+=("$dev")
	eval "$1[\$2]=\$dev"
}
attach_loop DEV a "$DATA/plain.raw"
WDEV[a]=${DEV[a]} # overwrites in place: the raw file reads the same afterwards
if measured f; then
	attach_loop DEV f "$WORK/floor/disk"
	WDEV[f]=${DEV[f]}
	PID[f]=$FLOOR_PID
fi
for d in "${DEPTHS[@]}"; do
	ATTACHED+=("d$d" "w$d")
	DEV[b$d]="$("$BIN" attach --run-dir "$R" --presentation "$PRESENTATION" "d$d")"
	WDEV[b$d]="$("$BIN" attach --run-dir "$R" --presentation "$PRESENTATION" "w$d")"
	PID[b$d]=$SERVER_PID
done
if measured c; then
	attach_loop DEV c "$QMNT-r"
	attach_loop WDEV c "$QMNT-w"
	PID[c]=$QSD_PID
fi
for cfg in "${CONFIGS[@]}"; do
	for dev in "${DEV[$cfg]}" "${WDEV[$cfg]}"; do
		n="$(basename "$dev")"
		log "$cfg: $dev dio=$(cat /sys/block/"$n"/loop/dio) sector=$(cat /sys/block/"$n"/queue/logical_block_size)"
	done
done

cpu_ticks() { # PID -> utime+stime in clock ticks
	awk '{print $14 + $15}' "/proc/$1/stat"
}

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
run_job() { # round cfg job
	local round=$1 cfg=$2 spec=$3 name rw bs qd t0 t1 json dev
	IFS=: read -r name rw bs qd <<<"$spec"
	json="$WORK/fio-$cfg-$name-$round.json"
	dev=${DEV[$cfg]}
	[[ $rw == *write ]] && dev=${WDEV[$cfg]}
	[[ -n ${PID[$cfg]:-} ]] && t0=$(cpu_ticks "${PID[$cfg]}")
	fio --name="$name" --filename="$dev" --rw="$rw" --bs="$bs" --iodepth="$qd" \
		--ioengine=libaio --direct=1 --size=1G --time_based --runtime="$RUNTIME" \
		--ramp_time=1 --randrepeat=0 --norandommap --output-format=json --output="$json"
	local cpu=""
	if [[ -n ${PID[$cfg]:-} ]]; then
		t1=$(cpu_ticks "${PID[$cfg]}")
		cpu=$(((t1 - t0) * 100 / $(getconf CLK_TCK)))
	fi
	python3 - "$json" "$round" "$cfg" "$name" "$cpu" "$((RUNTIME + 1))" >>"$RESULTS" <<'EOF'
import json, sys
path, rnd, cfg, name, cpu, secs = sys.argv[1:]
job = json.load(open(path))["jobs"][0]
side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
# CPU: centiseconds of the serving process over the job (ramp included) -> % of one core
pct = "" if cpu == "" else "%.0f" % (int(cpu) / int(secs))
print("\t".join([rnd, cfg, name, "%.0f" % side["iops"], "%.1f" % (side["bw"] / 1024), pct]))
EOF
}

TOTAL=$((ROUNDS * ${#CONFIGS[@]} * ${#JOBS[@]} * (RUNTIME + 1)))
log "measuring: $ROUNDS rounds x ${#CONFIGS[@]} configs x ${#JOBS[@]} jobs x $((RUNTIME + 1)) s = about $((TOTAL / 60)) min"
for round in $(seq 1 "$ROUNDS"); do
	for cfg in "${CONFIGS[@]}"; do
		for spec in "${JOBS[@]}"; do
			run_job "$round" "$cfg" "$spec"
		done
		log "round $round: $cfg done"
	done
done

# The table: medians over rounds.
REPORT="$WORK/report.md"
python3 - "$RESULTS" "$ROUNDS" "$RUNTIME" "$(nproc)" "$(uname -r)" \
	"$(findmnt -no FSTYPE,SOURCE -T "$DATA" | head -1)" "$RAM" "$PRESENTATION" "${CONFIGS[*]}" "$SERVED_OVER" >"$REPORT" <<'EOF'
import statistics, sys
path, rounds, runtime, ncpu, kernel, fs, ram, pres, measured, transport = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
titles = {"a": "a: loop on raw", "f": "f: FUSE floor", "c": "c: qcow2 (qsd FUSE)"}
cfgs = measured.split()
jobs = []
data = {}
for rnd, cfg, job, iops, mibs, cpu in rows:
    if job not in jobs:
        jobs.append(job)
    data.setdefault((cfg, job), []).append((float(iops), float(mibs), cpu))
def med(cfg, job, k):
    return statistics.median(v[k] for v in data[(cfg, job)])
def cpu(cfg, job):
    vals = [float(v[2]) for v in data[(cfg, job)] if v[2] != ""]
    return "" if not vals else "%.0f%%" % statistics.median(vals)
seq = lambda job: "1m" in job
print(f"{rounds} rounds x {runtime} s per job (+1 s ramp), medians; kernel {kernel}, {ncpu} CPUs; data on {fs}{' (RAM-backed loop)' if ram == '1' else ''}; b* attached as {pres}, FUSE over {transport}.")
print()
peer = "b1" in cfgs and "c" in cfgs
print("| job | " + " | ".join(titles.get(c, c) for c in cfgs) + (" | b1/c |" if peer else " |"))
print("|---|" + "---|" * (len(cfgs) + peer))
for job in jobs:
    k = 1 if seq(job) else 0
    unit = "MiB/s" if seq(job) else "IOPS"
    a = med("a", job, k)
    cells = [f"{a:,.0f} {unit}"]
    for cfg in cfgs[1:]:
        v = med(cfg, job, k)
        cells.append(f"{v / a:.2f}x ({v:,.0f})")
    if peer:
        cells.append(f"{med('b1', job, k) / med('c', job, k):.2f}")
    print(f"| {job} | " + " | ".join(cells) + " |")
print()
print("CPU of the serving process (% of one core, median): ")
print()
print("| job | " + " | ".join(cfgs[1:]) + " |")
print("|---|" + "---|" * len(cfgs[1:]))
for job in jobs:
    print(f"| {job} | " + " | ".join(cpu(c, job) for c in cfgs[1:]) + " |")
print()
print("Every round (IOPS, or MiB/s for 1m jobs):")
print()
print("| job | config | " + " | ".join(f"round {r}" for r in range(1, int(rounds) + 1)) + " |")
print("|---|---|" + "---|" * int(rounds))
for job in jobs:
    k = 1 if seq(job) else 0
    for cfg in cfgs:
        print(f"| {job} | {cfg} | " + " | ".join(f"{v[k]:,.0f}" for v in data[(cfg, job)]) + " |")
EOF
cat "$REPORT"
[[ -n $OUT ]] && cp "$REPORT" "$OUT"

# A CPU profile of the server when the merged view falls short (or when asked).
need_profile=$(python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]) if l.strip()]
def med(cfg, job, k):
    return statistics.median(float(r[3 + k]) for r in rows if r[1] == cfg and r[2] == job)
try:
    rr = med("b1", "randread-4k-qd32", 0) / med("a", "randread-4k-qd32", 0)
    sq = med("b1", "read-1m-qd8", 1) / med("a", "read-1m-qd8", 1)
except statistics.StatisticsError:  # --only left those out
    rr, sq = 1, 1
print(1 if rr < 0.5 or sq < 0.9 else 0)
EOF
)
if [[ $PRESENTATION == composed ]]; then
	need_profile=0 PROFILE=0 # no process serves a composed device: nothing to profile
fi
if [[ $PROFILE == 1 || $need_profile == 1 ]]; then
	if command -v perf >/dev/null; then
		for target in "${PROFILE_JOBS[@]}"; do
			cfg=${target%%:*} spec=${target#*:} name=${spec%%:*}
			if [[ -z ${PID[$cfg]:-} ]]; then # not measured (--only), or a: no serving process
				log "no serving process of $cfg to profile during $name"
				continue
			fi
			log "profiling the server during $name on $cfg"
			data="$WORK/perf-$cfg-$name.data"
			perf record -q -g -F 999 -p "${PID[$cfg]}" -o "$data" -- sleep "$((RUNTIME + 1))" &
			perf_pid=$!
			run_job profile "$cfg" "$spec"
			wait "$perf_pid" || true
			perf report -i "$data" --no-children --sort sym --stdio -g none >"$data.self" 2>/dev/null || true
			perf report -i "$data" --children --sort sym --stdio -g none >"$data.incl" 2>/dev/null || true
			{
				echo
				echo "perf profile of the server during $name on $cfg: self time (perf report --no-children --sort sym -g none), top 30:"
				echo
				echo '```'
				{ grep -v -e '^#' -e '^$' "$data.self" || true; } | sed -n 1,30p | cut -c1-150
				echo '```'
				echo
				echo "Inclusive time of the server's own (user-space) functions (perf report --children), top 25:"
				echo
				echo '```'
				{ grep -F '[.]' "$data.incl" || true; } | sed -n 1,25p | cut -c1-150
				echo '```'
			} | tee -a "$REPORT"
		done
		if [[ -n $OUT ]]; then cp "$REPORT" "$OUT"; fi
	else
		log "perf is not installed (apt-get install linux-perf): no profile"
	fi
fi
