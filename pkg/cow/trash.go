package cow

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// The trash (DIR/.trash) takes the files a transaction frees. Unlinking a large fragmented
// sparse file can take minutes (every extent is freed, and discarded on a discard mount);
// under the exclusive store lock that would stall every other operation on the store. So a
// transaction only renames freed files into the trash, which is O(1), and they are unlinked
// after the lock is released. Only files no manifest names are ever moved there, so emptying
// needs no lock; two processes emptying one trash at once merely both try each unlink.

// trashHook, when set, is called with each trash entry's path before it is unlinked: tests
// stall an emptying with it.
var trashHook atomic.Pointer[func(path string)]

// trasher runs a store's trash emptying: at most one pass at a time, in a goroutine that
// exits when no pass is asked for.
type trasher struct {
	mu      sync.Mutex
	cond    sync.Cond // signalled when a pass finishes
	running bool
	asked   uint64 // passes asked for so far
	done    uint64 // every pass asked for up to this one has been run
	err     error  // of the last pass
}

func (s *Store) trashDir() string { return filepath.Join(s.dir, ".trash") }

// kickTrash asks for a pass over the trash, which starts after every file moved there so
// far. It returns at once.
func (s *Store) kickTrash() {
	t := &s.trash
	t.mu.Lock()
	defer t.mu.Unlock()
	t.asked++
	if !t.running {
		t.running = true
		go s.trashLoop()
	}
}

func (s *Store) trashLoop() {
	t := &s.trash
	t.mu.Lock()
	for t.done < t.asked {
		covers := t.asked // the pass lists the trash after every move these asked for
		t.mu.Unlock()
		err := s.emptyTrash()
		t.mu.Lock()
		t.done, t.err = covers, err
		t.cond.Broadcast()
	}
	t.running = false
	t.mu.Unlock()
}

// WaitTrash waits until the files this Store has moved to its trash so far are unlinked,
// and returns the error of the last emptying, if any. DeleteVolume, DeleteSnapshot and
// Collect wait by themselves (without holding the store lock); other operations leave it to
// the background. Call it before the process exits, so that no unlink is left half way
// (harmless, though: the next OpenStore empties what is left).
func (s *Store) WaitTrash() error {
	t := &s.trash
	t.mu.Lock()
	defer t.mu.Unlock()
	for want := t.asked; t.done < want; {
		t.cond.Wait()
	}
	return t.err
}

// emptyTrashNow empties the trash, including what a crash or another process left there, and
// waits for it.
func (s *Store) emptyTrashNow() error {
	s.kickTrash()
	return s.WaitTrash()
}

// waitFreed waits for the files an operation freed to be unlinked, so that its caller sees
// the space free when it returns, as before the trash existed. The operation is committed:
// a failed unlink is logged by the pass and retried by the next one.
func (s *Store) waitFreed() {
	_ = s.WaitTrash()
}

// trashPending reports whether the trash holds anything (left by a crash or by an emptying
// that another process had not finished).
func (s *Store) trashPending() bool {
	d, err := os.Open(s.trashDir())
	if err != nil {
		return false
	}
	defer d.Close()
	names, _ := d.Readdirnames(1)
	return len(names) > 0
}

// emptyTrash unlinks everything in the trash. It holds no lock (see above); an entry gone
// already (another process unlinked it) is fine.
func (s *Store) emptyTrash() error {
	entries, err := os.ReadDir(s.trashDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		klog.ErrorS(err, "Cannot list the store's trash", "store", s.dir)
		return fmt.Errorf("empty trash: %w", err)
	}
	start := time.Now()
	var first error
	n := 0
	for _, e := range entries {
		path := filepath.Join(s.trashDir(), e.Name())
		if h := trashHook.Load(); h != nil {
			(*h)(path)
		}
		// RemoveAll: a stray directory that lay in layers/ is moved here too; a missing
		// entry is no error.
		if err := os.RemoveAll(path); err != nil {
			klog.ErrorS(err, "Cannot remove a freed file from the store's trash", "path", path)
			if first == nil {
				first = fmt.Errorf("empty trash: %w", err)
			}
			continue
		}
		n++
	}
	if n > 0 {
		klog.V(2).InfoS("Emptied the store's trash", "store", s.dir, "files", n, "duration", time.Since(start))
	}
	return first
}

// moveToTrash renames path into the trash (the caller holds the exclusive store lock and
// has made the trash directory). A file already gone is no error.
func (s *Store) moveToTrash(path string) (moved bool, err error) {
	base := filepath.Join(s.trashDir(), filepath.Base(path))
	dst := base
	// Names are unique (random ids and temp names), but a rename onto an entry still there
	// would unlink that entry's file here, under the lock.
	for i := 1; ; i++ {
		if _, err := os.Lstat(dst); err != nil {
			break
		}
		dst = fmt.Sprintf("%s.%d", base, i)
	}
	if err := os.Rename(path, dst); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("move %s to the trash: %w", path, err)
	}
	return true, nil
}
