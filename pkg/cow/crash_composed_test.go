package cow_test

// Crash tests of the composed path (see crash_test.go for the merged view's): on xfs and
// btrfs a child process attaches the volume as the server's attachComposed does (Hold,
// Compose, then the top file alone is the volume), writes, punches and fdatasyncs that
// file as a loop device would, and snapshots the volume as the server's Snapshot does (the
// device flushed, then the store clones the held top into a frozen opaque layer). It is
// killed with SIGKILL at random moments, during Compose and snapshots too; after every
// kill the store must be clean, the volume must hold what the child wrote, and every
// snapshot exactly what the volume held when it was taken.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

const (
	// crashComposedEnv, set next to crashEnv, makes the child that runAndKill starts the
	// composed path's child (see TestCrashChild). Its value is the wall-clock time (Unix ns)
	// at which the child starts composing, so that the parent can aim its kill at Compose.
	crashComposedEnv = "COW_CRASH_COMPOSED"

	// The composed child's records besides opWrite (a pwrite), opDisc (a hole punched) and
	// opFlush. Like flush records they have n == 0 and touch no cell, so readIntents and
	// checkCrashState pass over them; the phase records carry the wall-clock time (Unix
	// ns) in off.
	opCompose  = 10 // Hold and Compose start
	opComposed = 11 // the volume is composed and its top file is open
	opSnap     = 12 // snapshot crashSnapName(gen) starts; any later record says it returned

	// crashKeptSnaps is how many snapshots the parent keeps from round to round (each
	// checked after every kill); it deletes the others.
	crashKeptSnaps = 6
)

func crashSnapName(gen int64) string { return fmt.Sprintf("s%d", gen) }

// crashLog is the child's side of intent.log and "flushed", as crashChild keeps them.
type crashLog struct{ intent, flushed *os.File }

func openCrashLog(dir string) (*crashLog, error) {
	l := &crashLog{}
	var err error
	l.intent, err = os.OpenFile(filepath.Join(dir, "intent.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err == nil {
		l.flushed, err = os.OpenFile(filepath.Join(dir, "flushed"), os.O_RDWR|os.O_CREATE, 0o600)
	}
	return l, err
}

// add appends a record before its operation starts: a write(2) is in the page cache at
// once, and a SIGKILL does not lose the page cache.
func (l *crashLog) add(op crashOp) error {
	rec := make([]byte, 0, recSize)
	for _, v := range []int64{op.gen, op.op, op.off, op.n} {
		rec = binary.LittleEndian.AppendUint64(rec, uint64(v))
	}
	_, err := l.intent.Write(rec)
	return err
}

// markFlushed records, durably, that everything up to generation gen is durable.
func (l *crashLog) markFlushed(gen int64) error {
	if _, err := l.flushed.WriteAt(binary.LittleEndian.AppendUint64(nil, uint64(gen)), 0); err != nil {
		return err
	}
	return l.flushed.Sync()
}

// crashRange picks a cell-aligned range of the volume: whole blocks, or parts of blocks.
func crashRange(r *rand.Rand) (off, n int64) {
	unit, most := int64(bs), int64(8)
	if r.IntN(2) == 0 {
		unit, most = cellSize, 3*bs/cellSize
	}
	off = r.Int64N(crashSize/unit) * unit
	return off, min((1+r.Int64N(most))*unit, crashSize-off)
}

// crashComposedChild attaches volume "vol" of the store in dir the composed way at the
// time given (Unix ns) and does I/O on its top file until it is killed.
func crashComposedChild(dir, at string) error {
	gen, err := strconv.ParseInt(os.Getenv(crashGenEnv), 10, 64)
	if err != nil {
		return err
	}
	start, err := strconv.ParseInt(at, 10, 64)
	if err != nil {
		return err
	}
	seed, _ := strconv.ParseUint(os.Getenv(crashSeedEnv), 10, 64)
	r := rand.New(rand.NewPCG(seed, uint64(gen)))
	log, err := openCrashLog(dir)
	if err != nil {
		return err
	}
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		return err
	}
	time.Sleep(time.Until(time.Unix(0, start)))
	phase := func(op int64) error {
		err := log.add(crashOp{gen: gen, op: op, off: time.Now().UnixNano()})
		gen++
		return err
	}
	if err := phase(opCompose); err != nil {
		return err
	}
	if _, err := st.Hold("vol"); err != nil { // released by the kill
		return err
	}
	if err := st.Compose("vol"); err != nil {
		return err
	}
	top, opaque, err := st.TopPath("vol")
	if err != nil {
		return err
	}
	if !opaque {
		return fmt.Errorf("the top %s of the composed volume is not opaque", top)
	}
	f, err := os.OpenFile(top, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if err := phase(opComposed); err != nil {
		return err
	}
	buf := make([]byte, 8*bs)
	deadline := time.Now().Add(30 * time.Second) // the parent kills it long before
	for ; time.Now().Before(deadline); gen++ {
		op := crashOp{gen: gen}
		switch k := r.IntN(100); {
		case k < 55:
			op.op = opWrite
			op.off, op.n = crashRange(r)
		case k < 85: // on an opaque top a hole reads zero: what a discard does
			op.op = opDisc
			op.off, op.n = crashRange(r)
		case k < 97:
			op.op = opFlush
		default:
			op.op = opSnap
		}
		if err := log.add(op); err != nil {
			return err
		}
		if err := composedChildOp(st, f, log, op, buf); err != nil {
			return err
		}
	}
	return errors.New("not killed within 30 s")
}

// composedChildOp does one operation of the composed child on the volume's top file f.
func composedChildOp(st *cow.Store, f *os.File, log *crashLog, op crashOp, buf []byte) error {
	switch op.op {
	case opWrite:
		p := buf[:op.n]
		fillCells(p, op.off, uint32(op.gen))
		_, err := f.WriteAt(p, op.off)
		return err
	case opDisc:
		return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, op.off, op.n)
	case opFlush:
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return err
		}
		return log.markFlushed(op.gen - 1)
	}
	// A snapshot, as the server takes one of a composed attachment: the device flushed
	// (fsync of the loop device reaches its file), then the store operation, routed to
	// snapshotOpaqueTop because this process holds the volume. The top stays the top.
	if err := f.Sync(); err != nil {
		return err
	}
	if err := st.Snapshot("vol", crashSnapName(op.gen), nil); err != nil {
		return err
	}
	if after, _, err := st.TopPath("vol"); err != nil || after != f.Name() {
		return fmt.Errorf("after snapshot %s the top is %s (%v), was %s", crashSnapName(op.gen), after, err, f.Name())
	}
	return nil
}

// cellsAfter returns the cell states from applying ops, in order, to from.
func cellsAfter(from []int64, ops []crashOp) []int64 {
	s := slices.Clone(from)
	for _, op := range ops {
		v := int64(cellZero)
		switch op.op {
		case opWrite:
			v = op.gen
		case opDisc:
		default:
			continue
		}
		for c := op.off / cellSize; c < (op.off+op.n)/cellSize; c++ {
			s[c] = v
		}
	}
	return s
}

// cellStates decodes every cell of a volume's content.
func cellStates(p []byte) ([]int64, error) {
	s := make([]int64, crashCell)
	for i := range s {
		var ok bool
		if s[i], ok = decodeCell(p[i*cellSize:(i+1)*cellSize], i); !ok {
			return nil, fmt.Errorf("cell %d (block %d +%d) holds bytes no operation wrote: %x", i, i*cellSize/bs, i*cellSize%bs, p[i*cellSize:i*cellSize+16])
		}
	}
	return s, nil
}

// diffCells describes the first cell where got differs from want, or returns "".
func diffCells(got, want []int64) string {
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("cell %d (block %d +%d) holds %d, want %d (%d = zeros)", i, i*cellSize/bs, i*cellSize%bs, got[i], want[i], cellZero)
		}
	}
	return ""
}

// composedCrash is the parent's state on one file system.
type composedCrash struct {
	t    *testing.T
	dir  string
	seed uint64
	r    *rand.Rand
	base []byte
	c    *cow.Chain // open between the check of a round and the next child; closed at cleanup

	known   []int64            // each cell of the volume when the parent last looked
	snaps   map[string][]int64 // every snapshot in the store and the cells it holds
	nextGen int64

	// lead is how long after its start the child begins composing; composeTook is how long
	// composing took the last time the parent saw it done.
	lead, composeTook time.Duration

	kills                            map[string]int // by what the child was doing
	ops, flushes, snapTried, snapped int
	snapCut                          int // kills during a snapshot that had committed it
	composed                         int // layers laid out by the Composes, all rounds
}

// TestCrashComposedKill kills a child that composes, writes, punches, flushes and
// snapshots a composed volume at random moments, on xfs and btrfs, and checks the store,
// the volume and every snapshot after every kill. A third of the rounds aim the kill at
// Compose: before each child the parent writes and freezes a few layers over the volume
// through the merged view, so there is always a chain to compose.
func TestCrashComposedKill(t *testing.T) {
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) { crashComposedKill(t, testfs.Mount(t, kind, 0)) })
	}
}

func crashComposedKill(t *testing.T, dir string) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(crashSeedEnv); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (%s reruns it)", seed, crashSeedEnv)
	x := &composedCrash{t: t, dir: dir, seed: seed, r: rand.New(rand.NewPCG(seed, 2)), base: crashBase(),
		snaps: map[string][]int64{}, nextGen: 1, lead: 60 * time.Millisecond, composeTook: 30 * time.Millisecond,
		kills: map[string]int{}}
	t.Cleanup(func() {
		if x.c != nil {
			x.c.Close()
		}
	})
	storeWithVolume(t, dir, x.base)
	var err error
	if x.known, err = cellStates(x.base); err != nil {
		t.Fatal(err)
	}
	st := x.openStore()
	x.c = x.openVolume(st)
	x.prelude(st)
	start := time.Now()
	// Extra rounds, if needed, until a kill has hit Compose and one a snapshot.
	rounds := 0
	for ; rounds < crashRounds() || (x.kills["compose"] == 0 || x.kills["snapshot"] == 0) && rounds < 3*crashRounds(); rounds++ {
		aim := rounds%3 == 1 || rounds >= crashRounds() && x.kills["compose"] == 0
		x.round(rounds, aim)
	}
	t.Logf("%d kills in %v: %v (%d of the snapshots cut short were committed); %d operations, %d flushes, %d snapshots started, %d taken; %d layers to compose, the last compose took %v",
		rounds, time.Since(start).Round(time.Millisecond), x.kills, x.snapCut, x.ops, x.flushes, x.snapTried, x.snapped, x.composed, x.composeTook.Round(time.Millisecond))
	if x.kills["compose"] == 0 || x.kills["snapshot"] == 0 {
		t.Fatalf("no kill during Compose or none during a snapshot in %d rounds: %v", rounds, x.kills)
	}
	if x.ops < 20*crashRounds() || x.flushes < crashRounds() || x.snapped < crashRounds()/3 {
		t.Fatalf("the child did too little: %d operations, %d flushes, %d snapshots", x.ops, x.flushes, x.snapped)
	}
}

// fail reports a failed round with what the child printed.
func (x *composedCrash) fail(round int, how, out string, format string, args ...any) {
	x.t.Helper()
	x.t.Fatalf("round %d (seed %d, killed %s): %s\nchild output:\n%s", round, x.seed, how, fmt.Sprintf(format, args...), out)
}

// openStore opens the store as a restarted server would: Collect tidies what a kill left,
// then Check must find nothing.
func (x *composedCrash) openStore() *cow.Store {
	x.t.Helper()
	st, err := cow.OpenStore(filepath.Join(x.dir, "store"))
	if err != nil {
		x.t.Fatal(err)
	}
	if err := st.Collect(); err != nil {
		x.t.Fatalf("collect: %v", err)
	}
	x.check(st, "after collect")
	return st
}

func (x *composedCrash) check(st *cow.Store, when string) {
	x.t.Helper()
	if probs, err := st.Check(false); err != nil || len(probs) > 0 {
		x.t.Fatalf("check %s: %v %v", when, err, probs)
	}
}

func (x *composedCrash) openVolume(st *cow.Store) *cow.Chain {
	x.t.Helper()
	c, err := st.Open("vol", cow.OpenOptions{})
	if err != nil {
		x.t.Fatalf("open the volume: %v", err)
	}
	return c
}

// round runs one child, kills it, checks everything, and prepares the next round. With
// aim, the kill falls while the child composes.
func (x *composedCrash) round(round int, aim bool) {
	t := x.t
	t.Helper()
	for _, f := range []string{"intent.log", "flushed"} {
		os.Remove(filepath.Join(x.dir, f))
	}
	delay := x.lead + x.composeTook + time.Duration(5+x.r.IntN(196))*time.Millisecond
	if aim {
		delay = x.lead + time.Duration(x.r.Int64N(int64(x.composeTook)*5/4+1))
	}
	t0 := time.Now()
	t.Setenv(crashComposedEnv, strconv.FormatInt(t0.Add(x.lead).UnixNano(), 10))
	out := runAndKill(t, x.dir, x.nextGen, x.seed+uint64(round), delay)
	ops, flushed := readIntents(t, x.dir)
	phase := x.learn(ops, t0)
	if n := len(ops); n > 0 {
		x.nextGen = ops[n-1].gen + 1
	}
	how := fmt.Sprintf("after %v during %s, %d records, flushed up to gen %d", delay.Round(time.Millisecond/10), phase, len(ops), flushed)

	st := x.openStore()
	if b, err := os.ReadFile(filepath.Join(x.dir, "base.raw")); err != nil || !bytes.Equal(b, x.base) {
		x.fail(round, how, out, "the base changed (%v) at %d", err, firstDiff(b, x.base))
	}
	// The volume, read through the engine (the read-write open readies the top as after a
	// crash: unwritten extents go).
	x.c = x.openVolume(st)
	got := make([]byte, crashSize)
	if _, err := x.c.ReadAt(got, 0); err != nil {
		x.fail(round, how, out, "read: %v", err)
	}
	var lost bool
	if err := checkCrashState(got, x.known, ops, flushed, &lost); err != nil {
		x.fail(round, how, out, "%v", err)
	}
	cells, err := cellStates(got)
	if err != nil {
		x.fail(round, how, out, "%v", err)
	}
	// Stricter: a SIGKILL loses no page cache, and nothing but the child writes the top,
	// so every operation is there but the last, which the kill may have cut short.
	done := ops
	if n := len(ops); n > 0 {
		done = ops[:n-1]
	}
	want, cut := cellsAfter(x.known, done), cellsAfter(x.known, ops)
	for i := range cells {
		if cells[i] != want[i] && cells[i] != cut[i] {
			x.fail(round, how, out, "a completed operation is lost: cell %d (block %d +%d) holds %d, want %d or, from the last operation, %d (%d = zeros; checkCrashState saw lost unflushed writes: %v)",
				i, i*cellSize/bs, i*cellSize%bs, cells[i], want[i], cut[i], cellZero, lost)
		}
	}
	if phase != "start-up" && phase != "compose" {
		if path, opaque, err := st.TopPath("vol"); err != nil || !opaque {
			x.fail(round, how, out, "the volume was composed, but its top %s is not opaque (%v)", path, err)
		}
	}
	x.checkSnapshots(st, round, how, out, ops)
	x.known = cells
	x.prelude(st)
}

// learn times the child's compose from its phase records, and says what it was doing when
// it was killed.
func (x *composedCrash) learn(ops []crashOp, t0 time.Time) string {
	var began, ended time.Duration
	for _, op := range ops {
		switch op.op {
		case opCompose:
			began = time.Unix(0, op.off).Sub(t0)
		case opComposed:
			ended = time.Unix(0, op.off).Sub(t0)
		case opFlush:
			x.flushes++
		case opSnap:
			x.snapTried++
		}
		if op.op != opCompose && op.op != opComposed {
			x.ops++
		}
	}
	if began > x.lead+5*time.Millisecond { // the child started late: start the next later
		x.lead = min(began+10*time.Millisecond, time.Second)
	}
	if ended > 0 {
		x.composeTook = ended - began
	}
	phase := "start-up"
	if n := len(ops); n > 0 {
		phase = map[int64]string{opCompose: "compose", opSnap: "snapshot", opFlush: "flush"}[ops[n-1].op]
		if phase == "" {
			phase = "I/O"
		}
	}
	x.kills[phase]++
	return phase
}

// checkSnapshots checks the snapshots the child started (one acknowledged, with a record
// after it, must exist; any that exists must hold exactly the volume as of its start)
// and all those kept from before, then deletes some so that crashKeptSnaps remain.
func (x *composedCrash) checkSnapshots(st *cow.Store, round int, how, out string, ops []crashOp) {
	x.t.Helper()
	names, err := st.Snapshots()
	if err != nil {
		x.fail(round, how, out, "list snapshots: %v", err)
	}
	for k, op := range ops {
		if op.op != opSnap {
			continue
		}
		name := crashSnapName(op.gen)
		switch {
		case slices.Contains(names, name):
			x.snaps[name] = cellsAfter(x.known, ops[:k])
			x.snapped++
			if k == len(ops)-1 {
				x.snapCut++
			}
		case k < len(ops)-1:
			x.fail(round, how, out, "snapshot %s was acknowledged but is missing", name)
		}
	}
	if want := slices.Sorted(maps.Keys(x.snaps)); !slices.Equal(names, want) {
		x.fail(round, how, out, "the store has snapshots %v, want %v", names, want)
	}
	for _, name := range names {
		cells, err := cellStates(readAll(x.t, st, name))
		if err != nil {
			x.fail(round, how, out, "snapshot %s: %v", name, err)
		}
		if d := diffCells(cells, x.snaps[name]); d != "" {
			x.fail(round, how, out, "snapshot %s: %s", name, d)
		}
	}
	for len(x.snaps) > crashKeptSnaps {
		keys := slices.Sorted(maps.Keys(x.snaps))
		name := keys[x.r.IntN(len(keys))]
		if err := st.DeleteSnapshot(name); err != nil {
			x.fail(round, how, out, "delete snapshot %s: %v", name, err)
		}
		delete(x.snaps, name)
	}
}

// prelude writes and discards through the merged view of the open volume x.c and freezes
// one to three layers of it (snapshots "p<gen>", checked with the others after the next
// kill), so that the next Compose lays out a chain of two layers or more (the first one
// frozen is the composed top of the round before), zero lists included.
// Then it closes the volume and checks the store and the volume.
func (x *composedCrash) prelude(st *cow.Store) {
	t := x.t
	t.Helper()
	buf := make([]byte, 8*bs)
	for layer := range 2 + x.r.IntN(3) {
		if layer > 0 {
			name := fmt.Sprintf("p%d", x.nextGen)
			if err := x.c.Snapshot(name, nil); err != nil {
				t.Fatalf("prelude snapshot: %v", err)
			}
			x.snaps[name] = x.known
		}
		for range 3 + x.r.IntN(8) {
			op := crashOp{gen: x.nextGen, op: opWrite}
			op.off, op.n = crashRange(x.r)
			var err error
			if x.r.IntN(3) == 0 {
				op.op = opDisc
				err = x.c.Discard(op.off, op.n)
			} else {
				fillCells(buf[:op.n], op.off, uint32(op.gen))
				_, err = x.c.WriteAt(buf[:op.n], op.off)
			}
			if err != nil {
				t.Fatalf("prelude: %v", err)
			}
			x.known = cellsAfter(x.known, []crashOp{op})
			x.nextGen++
		}
	}
	err := x.c.Close()
	x.c = nil
	if err != nil {
		t.Fatalf("close: %v", err)
	}
	x.check(st, "after the prelude")
	cells, err := cellStates(readAll(t, st, "vol"))
	if err != nil {
		t.Fatalf("after the prelude: %v", err)
	}
	if d := diffCells(cells, x.known); d != "" {
		t.Fatalf("after the prelude: %s", d)
	}
	// What the next Compose lays out: the layers from the highest opaque one (or the base) up.
	info, err := st.Info("vol")
	if err != nil {
		t.Fatal(err)
	}
	from := 0
	for i, l := range info.Layers {
		if l.Opaque {
			from = i
		}
	}
	if n := len(info.Layers) - from; n >= 2 {
		x.composed += n
	} else {
		t.Fatalf("the prelude left %d layers to compose: %+v", n, info.Layers)
	}
}
