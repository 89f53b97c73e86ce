package cow

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/internal/testfs"
)

// setTrashHook installs fn as the trash hook for the test's duration.
func setTrashHook(t *testing.T, fn func(path string)) {
	t.Helper()
	trashHook.Store(&fn)
	t.Cleanup(func() { trashHook.Store(nil) })
}

// trashEntries lists the store's trash (nil when it does not exist).
func trashEntries(t *testing.T, st *Store) []string {
	t.Helper()
	entries, err := os.ReadDir(st.trashDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// storeFiles lists every file and directory under the store's dir but locks/.
func storeFiles(t *testing.T, st *Store) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(st.Dir(), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(st.Dir(), path)
		if rel == "locks" {
			return filepath.SkipDir
		}
		if rel != "." {
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// writtenVolume creates volume name with n bytes of data written at its start.
func writtenVolume(t *testing.T, st *Store, name string, size, n int64) {
	t.Helper()
	if err := st.Create(name, CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	c, err := st.Open(name, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(bytes.Repeat([]byte{0x5a}, int(n)), 0); err != nil {
		c.Close()
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

func layerPathsOf(t *testing.T, st *Store, name string) []string {
	t.Helper()
	info, err := st.Info(name)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, l := range info.Layers {
		paths = append(paths, l.Path)
	}
	return paths
}

func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		t.Fatal(err)
	}
	return int64(sfs.Bfree) * sfs.Bsize
}

// TestDeleteEmptiesTrash: the files DeleteVolume and DeleteSnapshot free are gone from the
// store, trash included, and their space is free when the call returns; a file a
// non-deleting transaction tidies away is gone once WaitTrash returns.
func TestDeleteEmptiesTrash(t *testing.T) {
	for _, kind := range []string{"ext4", "xfs"} {
		t.Run(kind, func(t *testing.T) {
			st, err := OpenStore(filepath.Join(testfs.Mount(t, kind, 256<<20), "store"))
			if err != nil {
				t.Fatal(err)
			}
			const data = 32 << 20
			writtenVolume(t, st, "v", 64<<20, data)
			if err := st.Snapshot("v", "s", nil); err != nil {
				t.Fatal(err)
			}
			writtenVolume(t, st, "keep", 1<<20, 4096)
			vLayers := layerPathsOf(t, st, "v") // [snapshot's layer, top]
			if len(vLayers) != 2 {
				t.Fatalf("v has layers %v, want 2", vLayers)
			}
			if entries := trashEntries(t, st); entries != nil {
				t.Fatalf("trash before any delete: %v", entries)
			}

			// The top is freed; the snapshot's layer (holding the data) stays.
			if err := st.DeleteVolume("v"); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(vLayers[1]); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the freed top %s: %v, want it gone", vLayers[1], err)
			}
			if _, err := os.Stat(vLayers[0]); err != nil {
				t.Errorf("the snapshot's layer: %v", err)
			}
			if _, err := os.Stat(st.trashDir()); err != nil {
				t.Errorf("no trash after a delete that freed a file: %v", err)
			}
			if entries := trashEntries(t, st); len(entries) != 0 {
				t.Errorf("trash after DeleteVolume returned: %v", entries)
			}

			// The snapshot's 32 MiB are free when DeleteSnapshot returns. Only on ext4: xfs
			// itself frees an unlinked file's blocks later, in a background worker.
			before := freeBytes(t, st.Dir())
			if err := st.DeleteSnapshot("s"); err != nil {
				t.Fatal(err)
			}
			if freed := freeBytes(t, st.Dir()) - before; kind == "ext4" && freed < data*9/10 {
				t.Errorf("DeleteSnapshot of a layer with %d bytes freed %d bytes", data, freed)
			}
			if _, err := os.Stat(vLayers[0]); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the snapshot's layer %s: %v, want it gone", vLayers[0], err)
			}
			if entries := trashEntries(t, st); len(entries) != 0 {
				t.Errorf("trash after DeleteSnapshot returned: %v", entries)
			}

			// A stray file of a crashed transaction goes to the trash with the next
			// transaction, which does not wait for it; WaitTrash does.
			stray := filepath.Join(st.Dir(), "layers", strings.Repeat("ab", 16)+".raw")
			if err := os.WriteFile(stray, []byte("left by a crash"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := st.Create("w", CreateOptions{Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(stray); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("stray file after a transaction: %v, want it moved away", err)
			}
			if err := st.WaitTrash(); err != nil {
				t.Fatal(err)
			}
			if entries := trashEntries(t, st); len(entries) != 0 {
				t.Errorf("trash after WaitTrash: %v", entries)
			}

			// Nothing but the live layers is left in the store.
			want := map[string]bool{"manifest.json": true, ".lock": true, "layers": true, ".trash": true}
			for _, name := range []string{"keep", "w"} {
				for _, p := range layerPathsOf(t, st, name) {
					want["layers/"+filepath.Base(p)] = true
				}
			}
			for _, f := range storeFiles(t, st) {
				if !want[f] {
					t.Errorf("left in the store: %s", f)
				}
			}
			if probs, err := st.Check(false); err != nil || len(probs) > 0 {
				t.Errorf("check: %v %v", probs, err)
			}
		})
	}
}

// TestTrashLeftByCrash: what a crash left in the trash is not reported by Check, and is
// emptied by the next OpenStore, or by Collect; the store's volumes are untouched.
func TestTrashLeftByCrash(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	st, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	writtenVolume(t, st, "v", 1<<20, 64<<10)
	// What a process killed half way through an emptying leaves: freed layers, a zero
	// list, a manifest temp file, and a directory that lay in layers/.
	plant := func() {
		t.Helper()
		trash := filepath.Join(dir, ".trash")
		if err := os.MkdirAll(filepath.Join(trash, "stray-dir", "sub"), 0o700); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{strings.Repeat("cd", 16) + ".raw", strings.Repeat("cd", 16) + ".zero",
			".manifest.json.tmp-123", "stray-dir/sub/f"} {
			if err := os.WriteFile(filepath.Join(trash, name), bytes.Repeat([]byte{1}, 8192), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	plant()
	if probs, err := st.Check(false); err != nil || len(probs) > 0 {
		t.Errorf("check with a full trash: %v %v", probs, err)
	}

	st2, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st2.WaitTrash(); err != nil {
		t.Fatal(err)
	}
	if entries := trashEntries(t, st2); len(entries) != 0 {
		t.Errorf("trash after OpenStore: %v", entries)
	}

	plant()
	if err := st2.Collect(); err != nil {
		t.Fatal(err)
	}
	if entries := trashEntries(t, st2); len(entries) != 0 {
		t.Errorf("trash after Collect: %v", entries)
	}

	c, err := st2.Open("v", OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, 64<<10)
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 64<<10)) {
		t.Errorf("volume after the trash was emptied: %v, data intact %v", err, bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 64<<10)))
	}
}

// TestTrashUnlinkOutsideLock stalls the unlink of a freed layer and checks that meanwhile
// the store lock is free, other operations (in this Store and in another one, as another
// process would) complete, and DeleteVolume has not returned yet. The other Store empties
// the same trash at the same time: the two unlinks of one file must both succeed.
func TestTrashUnlinkOutsideLock(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	st, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	writtenVolume(t, st, "v", 1<<20, 64<<10)
	writtenVolume(t, st, "w", 1<<20, 4096)
	vTop := layerPathsOf(t, st, "v")[0]

	stalled := make(chan string, 1)
	release := make(chan struct{})
	var first atomic.Bool
	setTrashHook(t, func(path string) {
		if strings.HasPrefix(path, dir+"/") && first.CompareAndSwap(false, true) {
			stalled <- path
			<-release
		}
	})
	var releaseOnce sync.Once
	unstall := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unstall) // never leave the emptier stuck

	deleted := make(chan error, 1)
	go func() { deleted <- st.DeleteVolume("v") }()
	var path string
	select {
	case path = <-stalled:
	case err := <-deleted:
		t.Fatalf("DeleteVolume returned (%v) without unlinking through the trash", err)
	case <-time.After(time.Minute):
		t.Fatal("no unlink started within a minute")
	}
	if filepath.Base(path) != filepath.Base(vTop) {
		t.Errorf("stalled unlink of %s, want the top of v %s", path, vTop)
	}
	if _, err := os.Stat(vTop); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("v's top in layers/ while being unlinked: %v", err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the stalled file is not in the trash: %v", err)
	}

	// The store lock is free while the unlink hangs.
	lk, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(lk.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Errorf("the store lock is held while a freed file is unlinked: %v", err)
	}
	lk.Close()

	// Other operations complete meanwhile: in this Store, and in another one that deletes
	// a volume too (and so empties the trash, v's file included, itself).
	others := make(chan error, 1)
	go func() {
		others <- func() error {
			if err := st.Create("x", CreateOptions{Size: 1 << 20}); err != nil {
				return err
			}
			if err := st.Snapshot("w", "ws", nil); err != nil {
				return err
			}
			c, err := st.Open("w", OpenOptions{})
			if err != nil {
				return err
			}
			if err := c.Close(); err != nil {
				return err
			}
			other, err := OpenStore(dir)
			if err != nil {
				return err
			}
			if err := other.DeleteVolume("x"); err != nil {
				return err
			}
			if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
				return errors.New("the other store's emptying left v's file in the trash")
			}
			return nil
		}()
	}()
	select {
	case err := <-others:
		if err != nil {
			t.Errorf("operation while an unlink was stalled: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("operations blocked while a freed file was being unlinked")
	}
	select {
	case err := <-deleted:
		t.Errorf("DeleteVolume returned (%v) before its freed file was unlinked", err)
	default:
	}

	unstall()
	if err := <-deleted; err != nil {
		t.Fatalf("DeleteVolume: %v", err)
	}
	if err := st.WaitTrash(); err != nil {
		t.Errorf("WaitTrash after an unlink that another store did first: %v", err)
	}
	if entries := trashEntries(t, st); len(entries) != 0 {
		t.Errorf("trash after DeleteVolume: %v", entries)
	}
	if vols, err := st.Volumes(); err != nil || strings.Join(vols, ",") != "w" {
		t.Errorf("volumes %v %v, want w", vols, err)
	}
	if probs, err := st.Check(false); err != nil || len(probs) > 0 {
		t.Errorf("check: %v %v", probs, err)
	}
}

// TestTrashOneEmptyingAtATime: while an emptying is stalled, more transactions free files;
// a Store never runs two emptyings at once, and the one after the stall takes them all.
func TestTrashOneEmptyingAtATime(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	st, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	var inFlight, most atomic.Int32
	stalled := make(chan struct{})
	release := make(chan struct{})
	var first atomic.Bool
	setTrashHook(t, func(path string) {
		if !strings.HasPrefix(path, dir+"/") {
			return
		}
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		if first.CompareAndSwap(false, true) {
			close(stalled)
			<-release
		}
	})
	var releaseOnce sync.Once
	unstall := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(unstall)

	if err := st.Create("first", CreateOptions{Size: 1 << 20}); err != nil { // writes the manifest
		t.Fatal(err)
	}
	// Each Create tidies a stray file away and so asks for an emptying, without waiting.
	strays := 5
	for i := range strays {
		stray := filepath.Join(dir, "layers", strings.Repeat(string(rune('a'+i)), 32)+".raw")
		if err := os.WriteFile(stray, []byte("stray"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := st.Create(string(rune('a'+i))+"-vol", CreateOptions{Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			select {
			case <-stalled:
			case <-time.After(time.Minute):
				t.Fatal("no emptying started within a minute")
			}
		}
	}
	if n := len(trashEntries(t, st)); n != strays {
		t.Errorf("%d files in the trash while the emptying is stalled, want %d", n, strays)
	}
	unstall()
	if err := st.WaitTrash(); err != nil {
		t.Fatal(err)
	}
	if entries := trashEntries(t, st); len(entries) != 0 {
		t.Errorf("trash after WaitTrash: %v", entries)
	}
	if m := most.Load(); m != 1 {
		t.Errorf("%d emptyings ran at once", m)
	}
}

// TestSnapshotCommittedThenFailed: a transaction that fails after its commit (here the move
// of a leftover file into the trash, blocked by a file where the trash directory belongs)
// has still frozen the top. A live chain must go on with the new top: writing on into the
// old one would change the snapshot under its name.
func TestSnapshotCommittedThenFailed(t *testing.T) {
	dir, st, c := openFreshVolume(t)
	before := bytes.Repeat([]byte("before"), 1000)
	if _, err := c.WriteAt(before, 0); err != nil {
		t.Fatal(err)
	}
	// A leftover layer file to trash, and a file where the trash directory goes.
	if err := os.WriteFile(filepath.Join(dir, "layers", strings.Repeat("ab", 16)+".raw"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(st.trashDir(), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	err := c.Snapshot("snap", nil)
	if err == nil {
		t.Fatal("the snapshot's tidying could not have succeeded")
	}
	if _, ierr := st.Info("snap"); ierr != nil {
		t.Fatalf("the snapshot failed after its commit (%v), yet it is not there: %v", err, ierr)
	}
	if _, err := c.WriteAt(bytes.Repeat([]byte("after!"), 1000), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !snapshotHolds(t, st, "snap", before) {
		t.Fatal("a write after the snapshot changed it: the chain went on writing into the frozen layer")
	}
	if err := os.Remove(st.trashDir()); err != nil {
		t.Fatal(err)
	}
}

// TestSnapshotWaitsForStoreWithIOGoing: while another process's transaction holds the store
// (a merge copying a layer can take minutes), a live snapshot waits for it without stopping
// the chain's I/O: the chain is quiesced only once the store is locked. A write made during
// the wait is in the snapshot.
func TestSnapshotWaitsForStoreWithIOGoing(t *testing.T) {
	dir, st, c := openFreshVolume(t)
	other, err := st.lockStore(unix.LOCK_EX) // its own open file: another process, for flock
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	done := make(chan error, 1)
	go func() { done <- c.Snapshot("snap", nil) }()
	waitForBlockedFlock(t, filepath.Join(dir, ".lock"))
	during := bytes.Repeat([]byte("during"), 1000)
	wrote := make(chan error, 1)
	go func() {
		_, err := c.WriteAt(during, 0)
		wrote <- err
	}()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		other.Close()
		t.Fatal("the chain's I/O stopped while its snapshot waited for the store's lock")
	}
	select {
	case err := <-done:
		t.Fatalf("the snapshot finished while the store was locked: %v", err)
	default:
	}
	other.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !snapshotHolds(t, st, "snap", during) {
		t.Fatal("the snapshot lacks the write completed before it took effect")
	}
}

// openFreshVolume makes a store with a 1 MiB volume "vol" and opens it read-write until the
// test ends.
func openFreshVolume(t *testing.T) (dir string, st *Store, c *Chain) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "store")
	st, err := OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("vol", CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if c, err = st.Open("vol", OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return dir, st, c
}

// snapshotHolds reports whether snapshot snap reads want at offset 0.
func snapshotHolds(t *testing.T, st *Store, snap string, want []byte) bool {
	t.Helper()
	c, err := st.OpenSnapshot(snap)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(got, want)
}

// waitForBlockedFlock waits until /proc/locks shows a request blocked on the file at path.
func waitForBlockedFlock(t *testing.T, path string) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	suffix := ":" + strconv.FormatUint(st.Ino, 10)
	for i := 0; i < 3000; i++ {
		locks, err := os.ReadFile("/proc/locks")
		if err != nil {
			testfs.Skip(t, "no /proc/locks: %v", err)
		}
		for _, line := range strings.Split(string(locks), "\n") {
			f := strings.Fields(line)
			if len(f) > 6 && f[1] == "->" && f[2] == "FLOCK" && strings.HasSuffix(f[6], suffix) {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("nothing waits for the lock of %s", path)
}
