package cow_test

// Crash tests: a child process writes, discards and flushes a volume and is killed with
// SIGKILL at random moments; after each kill the volume must hold every flushed write (or
// a later one) and never zeros that nobody asked for. And a top layer with an UNWRITTEN
// extent (what a crash in the middle of a write can leave on ext4 and xfs) must read as if
// that extent were absent, and lose it when opened for writing.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

const (
	crashEnv     = "COW_CRASH_CHILD" // the directory the child works in
	crashGenEnv  = "COW_CRASH_GEN"   // the first generation the child uses
	crashSeedEnv = "COW_CRASH_SEED"

	crashBlocks = 256
	crashSize   = crashBlocks * bs
	// The volume is checked in cells of 64 bytes: every write and discard of the child is
	// cell-aligned (mostly not block-aligned), so each cell holds one generation or zeros.
	cellSize  = 64
	crashCell = crashSize / cellSize

	cellTag = 0x5A

	opWrite  = 1
	opDisc   = 2
	opZeroes = 3
	opFlush  = 4
	recSize  = 32 // an intent record: gen, op, off, len (uint64 LE each)

	cellZero = -1 // a cell state: all zeros
)

// fillCells fills p (at the cell-aligned volume offset off) with generation gen: every
// 8-byte word is [tag, cell index (3 bytes), gen (4 bytes)].
func fillCells(p []byte, off int64, gen uint32) {
	for i := 0; i < len(p); i += 8 {
		cell := uint32((off + int64(i)) / cellSize)
		binary.LittleEndian.PutUint32(p[i:], cellTag|cell<<8)
		binary.LittleEndian.PutUint32(p[i+4:], gen)
	}
}

// decodeCell returns the state of cell i: its generation, cellZero, or ok false when the
// bytes are neither all zero nor eight words of one generation of this very cell.
func decodeCell(p []byte, i int) (int64, bool) {
	if allZero(p) {
		return cellZero, true
	}
	gen := binary.LittleEndian.Uint32(p[4:])
	for k := 0; k < cellSize; k += 8 {
		if binary.LittleEndian.Uint32(p[k:]) != cellTag|uint32(i)<<8 || binary.LittleEndian.Uint32(p[k+4:]) != gen {
			return 0, false
		}
	}
	return int64(gen), true
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// crashBase is the base image: generation 0 in every block but those with b%7 == 6
// (holes).
func crashBase() []byte {
	p := make([]byte, crashSize)
	for b := range crashBlocks {
		if b%7 != 6 {
			fillCells(p[b*bs:(b+1)*bs], int64(b*bs), 0)
		}
	}
	return p
}

// TestCrashChild is the child of TestCrashKill; run alone it does nothing.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashEnv)
	if dir == "" {
		return
	}
	// the composed path's child when its parent asks for it (crash_composed_test.go)
	if at := os.Getenv(crashComposedEnv); at != "" {
		err := crashComposedChild(dir, at)
		fmt.Fprintf(os.Stderr, "composed crash child: %v\n", err)
		os.Exit(3) // it returns only on error or after its safety timeout
	}
	if err := crashChild(dir); err != nil {
		fmt.Fprintf(os.Stderr, "crash child: %v\n", err)
		os.Exit(3)
	}
	os.Exit(4) // crashChild returns only on error or after its safety timeout
}

// crashChild opens the volume and loops until killed. Before each operation it appends
// the intent to intent.log (a write(2) is in the page cache before the operation starts,
// and a SIGKILL does not lose the page cache); after each Flush it writes the last
// generation it covers to "flushed" and fsyncs it.
func crashChild(dir string) error {
	gen, err := strconv.ParseUint(os.Getenv(crashGenEnv), 10, 32)
	if err != nil {
		return err
	}
	seed, _ := strconv.ParseUint(os.Getenv(crashSeedEnv), 10, 64)
	r := rand.New(rand.NewPCG(seed, gen))
	intent, err := os.OpenFile(filepath.Join(dir, "intent.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	flushed, err := os.OpenFile(filepath.Join(dir, "flushed"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		return err
	}
	c, err := st.Open("vol", cow.OpenOptions{})
	if err != nil {
		return err
	}
	buf := make([]byte, 8*bs)
	rec := make([]byte, recSize)
	deadline := time.Now().Add(30 * time.Second) // the parent kills it long before
	for ; time.Now().Before(deadline); gen++ {
		var op, off, n int64
		switch k := r.IntN(20); {
		case k < 5: // aligned write
			op, off, n = opWrite, int64(r.IntN(crashBlocks))*bs, int64(1+r.IntN(8))*bs
		case k < 10: // cell-aligned write: parts of blocks
			op, off, n = opWrite, int64(r.IntN(crashCell))*cellSize, int64(1+r.IntN(3*bs/cellSize))*cellSize
		case k < 12: // aligned discard
			op, off, n = opDisc, int64(r.IntN(crashBlocks))*bs, int64(1+r.IntN(8))*bs
		case k < 15:
			op, off, n = opDisc, int64(r.IntN(crashCell))*cellSize, int64(1+r.IntN(6*bs/cellSize))*cellSize
		case k < 17:
			op, off, n = opZeroes, int64(r.IntN(crashCell))*cellSize, int64(1+r.IntN(6*bs/cellSize))*cellSize
		default:
			op = opFlush
		}
		n = min(n, crashSize-off)
		binary.LittleEndian.PutUint64(rec[0:], gen)
		binary.LittleEndian.PutUint64(rec[8:], uint64(op))
		binary.LittleEndian.PutUint64(rec[16:], uint64(off))
		binary.LittleEndian.PutUint64(rec[24:], uint64(n))
		if _, err := intent.Write(rec); err != nil {
			return err
		}
		switch op {
		case opWrite:
			p := buf[:n]
			fillCells(p, off, uint32(gen))
			if _, err := c.WriteAt(p, off); err != nil {
				return err
			}
		case opDisc:
			if err := c.Discard(off, n); err != nil {
				return err
			}
		case opZeroes:
			if err := c.WriteZeroes(off, n); err != nil {
				return err
			}
		case opFlush:
			if err := c.Flush(); err != nil {
				return err
			}
			// Everything up to gen-1 is durable now.
			var g [8]byte
			binary.LittleEndian.PutUint64(g[:], gen-1)
			if _, err := flushed.WriteAt(g[:], 0); err != nil {
				return err
			}
			if err := flushed.Sync(); err != nil {
				return err
			}
		}
	}
	return errors.New("not killed within 30 s")
}

type crashOp struct {
	gen, op, off, n int64
}

// crashRounds is how many times the child is killed on each file system.
func crashRounds() int {
	if testing.Short() {
		return 15
	}
	return 50
}

// TestCrashKill kills a writing child process at random moments, on the root file system
// and on xfs and btrfs, and checks the volume after every kill.
func TestCrashKill(t *testing.T) {
	t.Run("tempdir", func(t *testing.T) { crashKill(t, t.TempDir()) })
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) { crashKill(t, testfs.Mount(t, kind, 0)) })
	}
}

func crashKill(t *testing.T, dir string) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("COW_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (COW_CRASH_SEED reruns it)", seed)
	r := rand.New(rand.NewPCG(seed, 1))
	base := crashBase()
	st := storeWithVolume(t, dir, base)
	// known is what each cell held when the parent last looked (and closed, so flushed).
	known := make([]int64, crashCell)
	for i := range known {
		if (i*cellSize/bs)%7 == 6 {
			known[i] = cellZero
		}
	}
	nextGen := int64(1)
	var totalOps, totalFlushes, roundsFlushed, roundsLost int
	start := time.Now()
	for round := range crashRounds() {
		os.Remove(filepath.Join(dir, "intent.log"))
		os.Remove(filepath.Join(dir, "flushed"))
		delay := time.Duration(5+r.IntN(196)) * time.Millisecond
		out := runAndKill(t, dir, nextGen, seed+uint64(round), delay)

		ops, flushed := readIntents(t, dir)
		for _, op := range ops {
			if op.op == opFlush {
				totalFlushes++
			}
		}
		totalOps += len(ops)
		if flushed > 0 {
			roundsFlushed++
		}
		if probs, err := st.Check(false); err != nil || len(probs) > 0 {
			t.Fatalf("round %d (killed after %v): check: %v %v\nchild output:\n%s", round, delay, err, probs, out)
		}
		c, err := st.Open("vol", cow.OpenOptions{})
		if err != nil {
			t.Fatalf("round %d: open after kill: %v", round, err)
		}
		got := make([]byte, crashSize)
		_, err = c.ReadAt(got, 0)
		if err != nil {
			c.Close()
			t.Fatalf("round %d: read: %v", round, err)
		}
		lost := false
		if err := checkCrashState(got, known, ops, flushed, &lost); err != nil {
			c.Close()
			t.Fatalf("round %d (killed after %v, %d ops, flushed up to gen %d): %v", round, delay, len(ops), flushed, err)
		}
		if lost {
			roundsLost++
		}
		if err := c.Close(); err != nil {
			t.Fatalf("round %d: close: %v", round, err)
		}
		if probs, err := st.Check(false); err != nil || len(probs) > 0 {
			t.Fatalf("round %d: check after reopen: %v %v", round, err, probs)
		}
		for i := range known {
			known[i], _ = decodeCell(got[i*cellSize:(i+1)*cellSize], i)
		}
		if n := len(ops); n > 0 {
			nextGen = ops[n-1].gen + 1
		}
	}
	t.Logf("%d kills in %v: %d operations, %d flushes, %d rounds flushed, %d rounds lost unflushed writes",
		crashRounds(), time.Since(start).Round(time.Millisecond), totalOps, totalFlushes, roundsFlushed, roundsLost)
	if totalOps < 20*crashRounds() || roundsFlushed < crashRounds()/3 {
		t.Fatalf("the child did too little: %d operations, %d of %d rounds flushed", totalOps, roundsFlushed, crashRounds())
	}
	// What the last look saw is what the volume holds after a clean close and reopen.
	got := readAll(t, st, "vol")
	for i := range known {
		if s, ok := decodeCell(got[i*cellSize:(i+1)*cellSize], i); !ok || s != known[i] {
			t.Fatalf("cell %d after the last clean close: %d (%v), want %d", i, s, ok, known[i])
		}
	}
}

// runAndKill starts the child, kills it after delay, and returns its output. The child
// dies with the test process too (Pdeathsig).
func runAndKill(t *testing.T, dir string, gen int64, seed uint64, delay time.Duration) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashEnv+"="+dir, fmt.Sprintf("%s=%d", crashGenEnv, gen), fmt.Sprintf("%s=%d", crashSeedEnv, seed))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := false
	t.Cleanup(func() {
		if !waited {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	err := cmd.Wait()
	waited = true
	var ee *exec.ExitError
	if !errors.As(err, &ee) || !ee.Sys().(syscall.WaitStatus).Signaled() {
		t.Fatalf("child ended by itself (%v) before the kill after %v:\n%s", err, delay, out.String())
	}
	return out.String()
}

// readIntents returns the child's operations of this round and the last flushed gen.
func readIntents(t *testing.T, dir string) ([]crashOp, int64) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "intent.log"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var ops []crashOp
	for len(data) >= recSize { // a record cut by the kill is ignored: its op never started
		u := func(i int) int64 { return int64(binary.LittleEndian.Uint64(data[i:])) }
		ops = append(ops, crashOp{gen: u(0), op: u(8), off: u(16), n: u(24)})
		data = data[recSize:]
	}
	var flushed int64
	if g, err := os.ReadFile(filepath.Join(dir, "flushed")); err == nil && len(g) == 8 {
		flushed = int64(binary.LittleEndian.Uint64(g))
	}
	return ops, flushed
}

// checkCrashState checks every cell of got: the cell's last operation at or before the
// last flush (or, with none, what the parent saw last time) or any later operation of the
// child must account for its content. Zeros only come from a discard or a hole.
func checkCrashState(got []byte, known []int64, ops []crashOp, flushed int64, lost *bool) error {
	// The operations touching each cell, in order.
	touch := make([][]int, crashCell)
	for k, op := range ops {
		if op.op == opFlush {
			continue
		}
		for c := op.off / cellSize; c < (op.off+op.n)/cellSize; c++ {
			touch[c] = append(touch[c], k)
		}
	}
	result := func(op crashOp) int64 {
		if op.op == opWrite {
			return op.gen
		}
		return cellZero
	}
	for i := range crashCell {
		s, ok := decodeCell(got[i*cellSize:(i+1)*cellSize], i)
		if !ok {
			return fmt.Errorf("cell %d (block %d +%d) holds bytes no operation wrote: %x", i, i*cellSize/bs, i*cellSize%bs, got[i*cellSize:i*cellSize+16])
		}
		// allowed: the flushed state and everything after it.
		allowed := []int64{known[i]}
		from := 0
		for j, k := range touch[i] {
			if ops[k].gen <= flushed {
				allowed = []int64{result(ops[k])}
				from = j + 1
			}
		}
		for _, k := range touch[i][from:] {
			allowed = append(allowed, result(ops[k]))
		}
		found := false
		for _, a := range allowed {
			found = found || a == s
		}
		if !found {
			what := fmt.Sprintf("generation %d", s)
			if s == cellZero {
				what = "zeros"
			}
			var hist []string
			for _, k := range touch[i] {
				hist = append(hist, fmt.Sprintf("%d:%d", ops[k].gen, result(ops[k])))
			}
			return fmt.Errorf("cell %d (block %d +%d) holds %s; allowed %v (before this round %d, operations gen:result %v)",
				i, i*cellSize/bs, i*cellSize%bs, what, allowed, known[i], hist)
		}
		if len(touch[i]) > 0 && s != result(ops[touch[i][len(touch[i])-1]]) {
			*lost = true
		}
	}
	return nil
}

// unwrittenBlocks returns the 4 KiB blocks that filefrag reports as unwritten in path.
func unwrittenBlocks(t *testing.T, path string) []int64 {
	t.Helper()
	out, err := exec.Command("filefrag", "-v", "-b4096", path).CombinedOutput()
	if err != nil {
		testfs.Skip(t, "filefrag -v %s: %v\n%s", path, err, out)
	}
	re := regexp.MustCompile(`^\s*\d+:\s+(\d+)\.\.\s*(\d+):`)
	var blocks []int64
	for _, line := range strings.Split(string(out), "\n") {
		m := re.FindStringSubmatch(line)
		if m == nil || !strings.Contains(line, "unwritten") {
			continue
		}
		a, _ := strconv.ParseInt(m[1], 10, 64)
		b, _ := strconv.ParseInt(m[2], 10, 64)
		for x := a; x <= b; x++ {
			blocks = append(blocks, x)
		}
	}
	return blocks
}

// TestCrashUnwrittenExtent plants UNWRITTEN extents in a closed volume's top layer (as a
// crash during a write can leave them): they read as absent (the base shows through, or
// zeros over a hole of the base), read-only opens leave them alone, and a read-write open
// punches them out while keeping the top's written data.
func TestCrashUnwrittenExtent(t *testing.T) {
	for _, kind := range []string{"ext4", "xfs"} {
		t.Run(kind, func(t *testing.T) {
			dir := testfs.Mount(t, kind, 0)
			base := crashBase() // block 6 is a hole, the others hold data
			st := storeWithVolume(t, dir, base)
			// The top holds blocks 3 and 11 (11 partly: copied up).
			c, err := st.Open("vol", cow.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			want := bytes.Clone(base)
			w3 := make([]byte, bs)
			fillCells(w3, 3*bs, 77)
			w11 := make([]byte, 2*cellSize)
			fillCells(w11, 11*bs+cellSize, 78)
			for _, w := range []struct {
				p   []byte
				off int64
			}{{w3, 3 * bs}, {w11, 11*bs + cellSize}} {
				if _, err := c.WriteAt(w.p, w.off); err != nil {
					t.Fatal(err)
				}
				copy(want[w.off:], w.p)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			info, err := st.Info("vol")
			if err != nil {
				t.Fatal(err)
			}
			top := info.Layers[len(info.Layers)-1].Path
			f, err := os.OpenFile(top, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			// Unwritten extents at block 2, at blocks 3..7 (3 holds data and stays
			// written; 6 lies over a hole of the base) and at 11..12.
			for _, r := range [][2]int64{{2, 1}, {3, 5}, {11, 2}} {
				if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, r[0]*bs, r[1]*bs); err != nil {
					f.Close()
					t.Fatalf("fallocate: %v", err)
				}
			}
			err = f.Sync()
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			planted := unwrittenBlocks(t, top)
			if fmt.Sprint(planted) != "[2 4 5 6 7 12]" {
				t.Fatalf("planted unwritten blocks %v, want [2 4 5 6 7 12]", planted)
			}

			// Read-only: the unwritten blocks read as absent and stay.
			if got := readAll(t, st, "vol"); !bytes.Equal(got, want) {
				t.Fatalf("read-only view differs from base+writes at %d", firstDiff(got, want))
			}
			if got := unwrittenBlocks(t, top); fmt.Sprint(got) != fmt.Sprint(planted) {
				t.Fatalf("a read-only open changed the unwritten blocks: %v, were %v", got, planted)
			}
			// Read-write: punched out, data kept.
			c, err = st.Open("vol", cow.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(want))
			if _, err := c.ReadAt(got, 0); err != nil {
				c.Close()
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				c.Close()
				t.Fatalf("read-write view differs from base+writes at %d", firstDiff(got, want))
			}
			// A partial write into a formerly unwritten block copies up the base's data.
			w2 := make([]byte, cellSize)
			fillCells(w2, 2*bs+5*cellSize, 79)
			if _, err := c.WriteAt(w2, 2*bs+5*cellSize); err != nil {
				c.Close()
				t.Fatal(err)
			}
			copy(want[2*bs+5*cellSize:], w2)
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			if got := unwrittenBlocks(t, top); len(got) != 0 {
				t.Fatalf("unwritten blocks left in the top after a read-write open: %v", got)
			}
			if got := readAll(t, st, "vol"); !bytes.Equal(got, want) {
				t.Fatalf("after reopen the volume differs at %d", firstDiff(got, want))
			}
			if probs, err := st.Check(false); err != nil || len(probs) > 0 {
				t.Fatalf("check: %v %v", err, probs)
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestCrashResizeCutShort: a grow commits the new size to the manifest before the top
// file follows. After a crash in between, the volume must still open (the top is grown
// then), and a snapshot or clone must not freeze the short file (which would make every
// chain over it unopenable), also of a held (composed, attached) volume, whose snapshots
// clone the top file.
func TestCrashResizeCutShort(t *testing.T) {
	for _, then := range []string{"open", "snapshot", "clone", "snapshot-held", "clone-held"} {
		t.Run(then, func(t *testing.T) {
			dir := t.TempDir()
			if strings.HasSuffix(then, "-held") {
				dir = testfs.Mount(t, "xfs", 0) // snapshots of a held volume clone its top file
			}
			st, err := cow.OpenStore(filepath.Join(dir, "store"))
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Create("vol", cow.CreateOptions{Size: 4 * bs}); err != nil {
				t.Fatal(err)
			}
			c, err := st.Open("vol", cow.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			want := make([]byte, 6*bs)
			fillCells(want[:4*bs], 0, 5)
			if _, err := c.WriteAt(want[:4*bs], 0); err != nil {
				t.Fatal(err)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			release := func() {}
			if strings.HasSuffix(then, "-held") {
				r, err := st.Hold("vol")
				if err != nil {
					t.Fatal(err)
				}
				release = sync.OnceFunc(r)
				t.Cleanup(release)
				if err := st.Compose("vol"); err != nil {
					t.Fatal(err)
				}
				then = strings.TrimSuffix(then, "-held")
			}
			// The crash: the manifest says 6 blocks, the top file still has 4.
			info, err := st.Info("vol")
			if err != nil {
				t.Fatal(err)
			}
			top := info.Layers[len(info.Layers)-1]
			editManifestFile(t, filepath.Join(st.Dir(), "manifest.json"), func(m map[string]any) {
				layerEntry(m, top.ID)["size"] = 6 * bs
			})
			names := []string{"vol"}
			switch then {
			case "snapshot":
				if err := st.Snapshot("vol", "snap", nil); err != nil {
					t.Fatal(err)
				}
				names = append(names, "snap")
			case "clone":
				if err := st.Clone("vol", "clone", nil); err != nil {
					t.Fatal(err)
				}
				names = append(names, "clone")
			}
			release()
			for _, name := range names {
				if got := readAll(t, st, name); !bytes.Equal(got, want) {
					t.Fatalf("%s: %d bytes, differs at %d", name, len(got), firstDiff(got, want))
				}
				c, err := st.OpenName(name)
				if err != nil {
					t.Fatalf("open %s: %v", name, err)
				}
				c.Close()
			}
			c, err = st.Open("vol", cow.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if c.Size() != 6*bs {
				t.Errorf("size %d after the grow was finished, want %d", c.Size(), 6*bs)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			if probs, err := st.Check(false); err != nil || len(probs) > 0 {
				t.Fatalf("check: %v %v", err, probs)
			}
		})
	}
}
