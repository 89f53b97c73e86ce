package cow_test

// Concurrency tests of one open chain: readers, full-block writers, partial writers that
// share blocks byte-wise, discards, flushes and live snapshots, all at once. Run them
// under the race detector: go test -race -run Concurrent ./pkg/cow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

const (
	bs = cow.BlockSize

	// Layout of the concurrency volume, in blocks.
	ccBlocks      = 256
	ccShared      = 64  // blocks [0, 64): every partial writer owns one slot in each
	ccFullFirst   = 64  // blocks [64, 128): full-block writers, 32 blocks each
	ccFullPer     = 32  //
	ccFullWriters = 2   //
	ccDiscFirst   = 128 // blocks [128, 160): the discarder
	ccDiscLast    = 160 // blocks [160, 256): nobody writes them
	ccPartial     = 6   // partial writers
	ccSlotOff     = 64  // slot w of a shared block is [64+640w, +512)
	ccSlotStride  = 640
	ccSlotLen     = 512

	tagPartial = 0xA5
	tagFull    = 0xB6
	tagDisc    = 0xC7
)

// ccBase is the base image's content: data in every block but those with b%5 == 3,
// which are holes (read zero), so shared blocks copy up from data and from holes.
func ccBase() []byte {
	p := make([]byte, ccBlocks*bs)
	for o := range p {
		if (o/bs)%5 == 3 {
			continue
		}
		p[o] = byte(o*131+o>>9) | 0x80
	}
	return p
}

// fillWords fills p, which starts at the 8-aligned volume offset off, with the words of
// owner's write number seq: [tag, owner, word index in block, block, seq (LE32)]. Every
// word names where it belongs, so data at a wrong offset cannot pass for right.
func fillWords(p []byte, off int64, tag, owner byte, seq uint32) {
	for i := 0; i+8 <= len(p); i += 8 {
		o := off + int64(i)
		w := p[i : i+8]
		w[0], w[1], w[2], w[3] = tag, owner, byte(o%bs/8), byte(o/bs)
		binary.LittleEndian.PutUint32(w[4:], seq)
	}
}

// decodeWord returns the seq of a word written by owner at offset o, or ok false.
func decodeWord(w []byte, o int64, tag, owner byte) (uint32, bool) {
	if w[0] != tag || w[1] != owner || w[2] != byte(o%bs/8) || w[3] != byte(o/bs) {
		return 0, false
	}
	return binary.LittleEndian.Uint32(w[4:]), true
}

// ccOp is one operation of a writer goroutine, kept to replay its effect.
type ccOp struct {
	kind     byte // 'w' write, 'd' discard, 'z' write-zeroes
	off, len int64
	seq      uint32
}

// ccWriter is one goroutine that owns some bytes of the volume.
type ccWriter struct {
	name    string
	tag     byte
	id      byte
	owned   []cow.Extent // the bytes it owns
	started atomic.Uint32
	done    atomic.Uint32
	log     []ccOp // written by the goroutine only; read after it ended
}

// apply replays op on a model of the volume.
func (w *ccWriter) apply(model []byte, op ccOp) {
	p := model[op.off : op.off+op.len]
	if op.kind == 'w' {
		fillWords(p, op.off, w.tag, w.id, op.seq)
	} else {
		clear(p)
	}
}

// matches reports whether got equals model over the bytes w owns; where it does not, the
// first differing offset.
func (w *ccWriter) matches(got, model []byte) (int64, bool) {
	for _, e := range w.owned {
		if !bytes.Equal(got[e.Off:e.End()], model[e.Off:e.End()]) {
			i := e.Off
			for got[i] == model[i] {
				i++
			}
			return i, false
		}
	}
	return 0, true
}

type ccSnap struct {
	name   string
	lo, hi []uint32 // per writer: ops done before the call, ops started by its return
}

// ccDuration is how long the I/O of a concurrency test runs.
func ccDuration() time.Duration {
	if testing.Short() {
		return 700 * time.Millisecond
	}
	return 2 * time.Second
}

func TestConcurrentIO(t *testing.T) {
	dir := t.TempDir()
	base := ccBase()
	st := storeWithVolume(t, dir, base)
	c, err := st.Open("vol", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			c.Close()
		}
	}()

	// Who owns what. Everything else must read as the base at every moment.
	var writers []*ccWriter
	for w := range ccPartial {
		cw := &ccWriter{name: fmt.Sprintf("partial-%d", w), tag: tagPartial, id: byte(w)}
		for b := range ccShared {
			cw.owned = append(cw.owned, cow.Extent{Off: int64(b*bs + ccSlotOff + w*ccSlotStride), Len: ccSlotLen})
		}
		writers = append(writers, cw)
	}
	for f := range ccFullWriters {
		first := ccFullFirst + f*ccFullPer
		writers = append(writers, &ccWriter{name: fmt.Sprintf("full-%d", f), tag: tagFull, id: byte(f),
			owned: []cow.Extent{{Off: int64(first * bs), Len: ccFullPer * bs}}})
	}
	disc := &ccWriter{name: "discarder", tag: tagDisc, id: 0,
		owned: []cow.Extent{{Off: ccDiscFirst * bs, Len: (ccDiscLast - ccDiscFirst) * bs}}}
	writers = append(writers, disc)
	ownerOf := make([]int8, ccBlocks*bs) // -1: nobody
	for i := range ownerOf {
		ownerOf[i] = -1
	}
	for i, w := range writers {
		for _, e := range w.owned {
			for o := e.Off; o < e.End(); o++ {
				ownerOf[o] = int8(i)
			}
		}
	}
	// lastDone[w][b]: the seq of writer w's last completed write to block b (partial and
	// full writers only: their words may never go back to an older seq).
	lastDone := make([][ccBlocks]atomic.Uint32, len(writers))

	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	fail := func(format string, args ...any) {
		select {
		case errs <- fmt.Errorf(format, args...):
		default:
		}
		stop.Store(true)
	}
	run := func(name string, fn func(r *rand.Rand)) {
		wg.Add(1)
		seed := uint64(len(name)) + uint64(time.Now().UnixNano())
		go func() {
			defer wg.Done()
			defer func() {
				if p := recover(); p != nil {
					fail("%s panicked: %v", name, p)
				}
			}()
			fn(rand.New(rand.NewPCG(seed, 7)))
		}()
	}

	// Partial writers: each writes its own slot of a random shared block, over and over.
	for wi := range ccPartial {
		w := writers[wi]
		run(w.name, func(r *rand.Rand) {
			buf := make([]byte, ccSlotLen)
			for seq := uint32(1); !stop.Load(); seq++ {
				b := r.IntN(ccShared)
				off := int64(b*bs + ccSlotOff + wi*ccSlotStride)
				fillWords(buf, off, w.tag, w.id, seq)
				w.started.Store(seq)
				if _, err := c.WriteAt(buf, off); err != nil {
					fail("%s: write: %v", w.name, err)
					return
				}
				w.log = append(w.log, ccOp{kind: 'w', off: off, len: ccSlotLen, seq: seq})
				lastDone[wi][b].Store(seq)
				w.done.Store(seq)
			}
		})
	}
	// Full-block writers: one or two whole blocks of their own range at a time.
	for f := range ccFullWriters {
		wi := ccPartial + f
		w := writers[wi]
		first := ccFullFirst + f*ccFullPer
		run(w.name, func(r *rand.Rand) {
			buf := make([]byte, 2*bs)
			for seq := uint32(1); !stop.Load(); seq++ {
				b := first + r.IntN(ccFullPer)
				n := 1 + r.IntN(2)
				if b+n > first+ccFullPer {
					n = 1
				}
				off := int64(b * bs)
				p := buf[:n*bs]
				fillWords(p, off, w.tag, w.id, seq)
				w.started.Store(seq)
				if _, err := c.WriteAt(p, off); err != nil {
					fail("%s: write: %v", w.name, err)
					return
				}
				w.log = append(w.log, ccOp{kind: 'w', off: off, len: int64(len(p)), seq: seq})
				for k := range n {
					lastDone[wi][b+k].Store(seq)
				}
				w.done.Store(seq)
			}
		})
	}
	// The discarder: writes (whole blocks and parts), discards and write-zeroes (aligned
	// and not) inside its own blocks.
	run(disc.name, func(r *rand.Rand) {
		buf := make([]byte, 3*bs)
		lo, hi := int64(ccDiscFirst*bs), int64(ccDiscLast*bs)
		for seq := uint32(1); !stop.Load(); seq++ {
			var op ccOp
			switch k := r.IntN(10); {
			case k < 3: // whole blocks
				b := ccDiscFirst + r.IntN(ccDiscLast-ccDiscFirst)
				op = ccOp{kind: 'w', off: int64(b * bs), len: int64((1 + r.IntN(3)) * bs)}
			case k < 5: // 8-aligned, mostly not block-aligned
				op = ccOp{kind: 'w', off: lo + 8*r.Int64N((hi-lo)/8), len: 8 * (1 + r.Int64N(3*bs/8))}
			case k < 7:
				b := ccDiscFirst + r.IntN(ccDiscLast-ccDiscFirst)
				op = ccOp{kind: 'd', off: int64(b * bs), len: int64((1 + r.IntN(3)) * bs)}
			case k < 9:
				op = ccOp{kind: 'd', off: lo + 8*r.Int64N((hi-lo)/8), len: 8 * (1 + r.Int64N(3*bs/8))}
			default:
				op = ccOp{kind: 'z', off: lo + 8*r.Int64N((hi-lo)/8), len: 8 * (1 + r.Int64N(2*bs/8))}
			}
			op.len = min(op.len, hi-op.off)
			op.seq = seq
			disc.started.Store(seq)
			var err error
			switch op.kind {
			case 'w':
				p := buf[:op.len]
				fillWords(p, op.off, disc.tag, disc.id, seq)
				_, err = c.WriteAt(p, op.off)
			case 'd':
				err = c.Discard(op.off, op.len)
			case 'z':
				err = c.WriteZeroes(op.off, op.len)
			}
			if err != nil {
				fail("discarder: %c [%d,+%d): %v", op.kind, op.off, op.len, err)
				return
			}
			disc.log = append(disc.log, op)
			disc.done.Store(seq)
		}
	})
	// Readers: random ranges, checked against what can be there at this moment.
	var reads atomic.Int64
	for ri := range 2 {
		run(fmt.Sprintf("reader-%d", ri), func(r *rand.Rand) {
			buf := make([]byte, 8*bs)
			lo := make([][]uint32, len(writers))
			for i := range lo {
				lo[i] = make([]uint32, ccBlocks)
			}
			for !stop.Load() {
				b0 := r.IntN(ccBlocks)
				n := min(1+r.IntN(8), ccBlocks-b0)
				p := buf[:n*bs]
				off := int64(b0 * bs)
				for wi := range writers {
					for b := b0; b < b0+n; b++ {
						lo[wi][b] = lastDone[wi][b].Load()
					}
				}
				if _, err := c.ReadAt(p, off); err != nil {
					fail("read: %v", err)
					return
				}
				if err := checkLive(p, off, base, ownerOf, writers, lo); err != nil {
					fail("reader: %v", err)
					return
				}
				reads.Add(1)
			}
		})
	}
	// A reader of the index.
	run("mapper", func(r *rand.Rand) {
		for !stop.Load() {
			var pos int64
			for _, me := range c.Map() {
				if me.Off != pos || me.Len <= 0 {
					fail("map: entry %+v after %d", me, pos)
					return
				}
				pos += me.Len
			}
			if pos != c.Size() {
				fail("map covers %d bytes of %d", pos, c.Size())
				return
			}
			time.Sleep(time.Millisecond)
		}
	})
	// Flushes.
	var flushes atomic.Int64
	run("flusher", func(r *rand.Rand) {
		for !stop.Load() {
			if err := c.Flush(); err != nil {
				fail("flush: %v", err)
				return
			}
			flushes.Add(1)
			time.Sleep(time.Duration(r.IntN(3000)) * time.Microsecond)
		}
	})
	// Live snapshots, each bracketed by what every writer had done before and started after.
	var snaps []ccSnap
	run("snapshotter", func(r *rand.Rand) {
		for i := 0; !stop.Load() && i < 24; i++ {
			time.Sleep(time.Duration(10+r.IntN(40)) * time.Millisecond)
			s := ccSnap{name: fmt.Sprintf("snap-%d", i), lo: make([]uint32, len(writers)), hi: make([]uint32, len(writers))}
			for wi, w := range writers {
				s.lo[wi] = w.done.Load()
			}
			var err error
			switch i % 3 {
			case 0:
				err = c.Snapshot(s.name, nil)
			case 1:
				err = st.Snapshot("vol", s.name, nil) // routed to the open chain
			default:
				err = st.SnapshotGroup([]string{"vol"}, []string{s.name}, nil)
			}
			if err != nil {
				fail("snapshot %s: %v", s.name, err)
				return
			}
			for wi, w := range writers {
				s.hi[wi] = w.started.Load()
			}
			snaps = append(snaps, s)
		}
	})

	deadline := time.After(ccDuration())
	select {
	case <-deadline:
	case err := <-errs:
		stop.Store(true)
		wg.Wait()
		t.Fatal(err)
	}
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	for _, w := range writers {
		t.Logf("%s: %d ops", w.name, len(w.log))
		if len(w.log) < 10 {
			t.Errorf("%s did only %d operations", w.name, len(w.log))
		}
	}
	t.Logf("%d reads, %d flushes, %d snapshots", reads.Load(), flushes.Load(), len(snaps))
	if len(snaps) < 5 || reads.Load() < 10 || flushes.Load() < 10 {
		t.Fatalf("too little happened: %d snapshots, %d reads, %d flushes", len(snaps), reads.Load(), flushes.Load())
	}

	// The end state: every byte is its owner's last write, or the base.
	final := make([]byte, len(base))
	models := make([][]byte, len(writers))
	for wi, w := range writers {
		models[wi] = bytes.Clone(base)
		for _, op := range w.log {
			w.apply(models[wi], op)
		}
	}
	checkFinal := func(what string, got []byte) {
		t.Helper()
		for wi, w := range writers {
			if o, ok := w.matches(got, models[wi]); !ok {
				t.Fatalf("%s: %s's byte at %d (block %d +%d) is %#x, want %#x", what, w.name, o, o/bs, o%bs, got[o], models[wi][o])
			}
		}
		checkUnowned(t, what, got, base, ownerOf)
	}
	if _, err := c.ReadAt(final, 0); err != nil {
		t.Fatal(err)
	}
	checkFinal("open chain", final)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	c2, err := st.Open("vol", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	clear(final)
	_, err = c2.ReadAt(final, 0)
	c2.Close()
	if err != nil {
		t.Fatal(err)
	}
	checkFinal("reopened", final)

	// Every snapshot is one point in time: for each writer, its state after some number of
	// its operations between those done before the call and those started by its return.
	for wi, w := range writers {
		model := bytes.Clone(base)
		applied := 0
		for _, s := range snaps {
			got := readAll(t, st, s.name)
			checkUnowned(t, s.name, got, base, ownerOf)
			// A write can be in an earlier snapshot before its writer counted it done, so a
			// later snapshot's lower bound may lie below the state the earlier one matched:
			// the search goes on from there, never back (snapshots are ordered).
			for applied < int(s.lo[wi]) {
				w.apply(model, w.log[applied])
				applied++
			}
			found := false
			var o int64
			for applied <= int(s.hi[wi]) {
				var ok bool
				if o, ok = w.matches(got, model); ok {
					found = true
					break
				}
				if applied >= len(w.log) {
					break
				}
				w.apply(model, w.log[applied])
				applied++
			}
			if !found {
				t.Fatalf("snapshot %s: %s's bytes match none of its states after %d..%d operations (first difference at %d, block %d +%d)",
					s.name, w.name, s.lo[wi], s.hi[wi], o, o/bs, o%bs)
			}
		}
	}
	probs, err := st.Check(false)
	if err != nil || len(probs) > 0 {
		t.Fatalf("check: %v %v", err, probs)
	}
}

// checkLive checks a read of [off, off+len(p)) taken while writers run: bytes nobody owns
// are the base's; every owned 8-byte word is the base's, zero (the discarder's only), or
// a word its owner wrote at that very offset, no older than the owner's last write to the
// block completed before the read began (lo), and never from a write not yet started.
func checkLive(p []byte, off int64, base []byte, ownerOf []int8, writers []*ccWriter, lo [][]uint32) error {
	for i := 0; i < len(p); i += 8 {
		o := off + int64(i)
		w := p[i : i+8]
		owner := ownerOf[o]
		if owner < 0 {
			if !bytes.Equal(w, base[o:o+8]) {
				return fmt.Errorf("unowned bytes at %d (block %d +%d) are %x, the base has %x", o, o/bs, o%bs, w, base[o:o+8])
			}
			continue
		}
		cw := writers[owner]
		hi := cw.started.Load()
		if bytes.Equal(w, base[o:o+8]) {
			if lo[owner][o/bs] > 0 {
				return fmt.Errorf("%s's word at %d (block %d +%d) is the base's after its write %d there completed", cw.name, o, o/bs, o%bs, lo[owner][o/bs])
			}
			continue
		}
		if cw.tag == tagDisc && binary.LittleEndian.Uint64(w) == 0 {
			continue
		}
		seq, ok := decodeWord(w, o, cw.tag, cw.id)
		switch {
		case !ok:
			return fmt.Errorf("%s's word at %d (block %d +%d) is %x: not its own, nor the base's %x", cw.name, o, o/bs, o%bs, w, base[o:o+8])
		case seq > hi:
			return fmt.Errorf("%s's word at %d has seq %d, but it has started only %d writes", cw.name, o, seq, hi)
		case seq < lo[owner][o/bs]:
			return fmt.Errorf("%s's word at %d (block %d +%d) has seq %d, older than its write %d completed before the read", cw.name, o, o/bs, o%bs, seq, lo[owner][o/bs])
		}
	}
	return nil
}

func checkUnowned(t *testing.T, what string, got, base []byte, ownerOf []int8) {
	t.Helper()
	for o := range got {
		if ownerOf[o] < 0 && got[o] != base[o] {
			t.Fatalf("%s: unowned byte at %d (block %d +%d) is %#x, the base has %#x", what, o, o/bs, o%bs, got[o], base[o])
		}
	}
}

// readAll reads a whole volume or snapshot through a read-only chain.
func readAll(t testing.TB, st *cow.Store, name string) []byte {
	t.Helper()
	c, err := st.OpenName(name)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	defer c.Close()
	p := make([]byte, c.Size())
	if _, err := c.ReadAt(p, 0); err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	return p
}

// writeSparse writes content to a new file at path, leaving all-zero blocks as holes.
// storeWithVolume writes base as a sparse file in dir and returns a store in dir/store
// holding volume "vol" over it.
func storeWithVolume(t testing.TB, dir string, base []byte) *cow.Store {
	t.Helper()
	basePath := filepath.Join(dir, "base.raw")
	writeSparse(t, basePath, base)
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("vol", cow.CreateOptions{Base: basePath}); err != nil {
		t.Fatal(err)
	}
	return st
}

func writeSparse(t testing.TB, path string, content []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zero := make([]byte, bs)
	for off := 0; off < len(content); off += bs {
		blk := content[off:min(off+bs, len(content))]
		if bytes.Equal(blk, zero[:len(blk)]) {
			continue
		}
		if _, err := f.WriteAt(blk, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(int64(len(content))); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentClose closes a chain while goroutines read, write, discard, flush and
// snapshot it: every call returns success or ErrClosed (no panic, no other error), and
// what was written before the close is there after reopening.
func TestConcurrentClose(t *testing.T) {
	dir := t.TempDir()
	base := ccBase()
	st := storeWithVolume(t, dir, base)
	c, err := st.Open("vol", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const workers = 4
	var wg sync.WaitGroup
	var bad atomic.Value
	var okOps, closedOps atomic.Int64
	// Worker w writes only block w*16+k with seq words; lastOK[w][k] is its last success.
	var lastOK [workers][16]atomic.Uint32
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if p := recover(); p != nil {
					bad.Store(fmt.Errorf("worker %d panicked: %v", w, p))
				}
			}()
			r := rand.New(rand.NewPCG(uint64(w), 3))
			buf := make([]byte, bs)
			for seq := uint32(1); ; seq++ {
				k := r.IntN(16)
				off := int64((w*16 + k) * bs)
				var err error
				switch r.IntN(6) {
				case 0, 1:
					fillWords(buf[:100*8], off+64, tagFull, byte(w), seq)
					_, err = c.WriteAt(buf[:100*8], off+64) // partial: copy-up
					if err == nil {
						lastOK[w][k].Store(seq)
					}
				case 2:
					_, err = c.ReadAt(buf, off)
				case 3:
					err = c.Flush()
				case 4:
					err = c.Snapshot(fmt.Sprintf("s-%d-%d", w, seq), nil)
				case 5:
					_, err = c.ReadAt(buf, int64(r.IntN(ccBlocks)*bs))
				}
				switch {
				case err == nil:
					okOps.Add(1)
				case errors.Is(err, cow.ErrClosed):
					closedOps.Add(1)
					if closedOps.Load() > 50 {
						return
					}
				default:
					bad.Store(fmt.Errorf("worker %d: %v", w, err))
					return
				}
			}
		}()
	}
	time.Sleep(ccDuration() / 4)
	if err := c.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	wg.Wait()
	if err, _ := bad.Load().(error); err != nil {
		t.Fatal(err)
	}
	if okOps.Load() < 10 || closedOps.Load() == 0 {
		t.Fatalf("%d calls succeeded, %d saw ErrClosed", okOps.Load(), closedOps.Load())
	}
	got := readAll(t, st, "vol")
	for w := range workers {
		for k := range 16 {
			off := int64((w*16 + k) * bs)
			seq := lastOK[w][k].Load()
			if seq == 0 {
				continue
			}
			want := make([]byte, 100*8)
			fillWords(want, off+64, tagFull, byte(w), seq)
			// Only worker w writes there, so its last success is what the block holds.
			if !bytes.Equal(got[off+64:off+64+800], want) {
				t.Errorf("block %d: the last acknowledged write (seq %d) is not there after close and reopen", w*16+k, seq)
			}
			if !bytes.Equal(got[off:off+64], base[off:off+64]) || !bytes.Equal(got[off+864:off+bs], base[off+864:off+bs]) {
				t.Errorf("block %d: bytes around the written range are not the base's", w*16+k)
			}
		}
	}
	probs, err := st.Check(false)
	if err != nil || len(probs) > 0 {
		t.Fatalf("check: %v %v", err, probs)
	}
}
