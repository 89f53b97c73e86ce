package cow

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// A base is read in place, wherever it lies. Composing a volume shares the base's blocks
// only when the base lies on the store's file system; over a base on another file system it
// would copy the base's data into every composed volume. LocalizeBase copies such a base into
// the store once instead: its entry becomes a base whose file is layers/ID.raw, and every
// chain over it, present and future, reads the copy. The original is never modified, and
// the store never removes it (RemoveBase may, when asked: nothing reads it any more).

// localizeHook, when set, runs after the copy is made and before the switch to it is
// committed, with the source's path: tests change the source there.
var localizeHook atomic.Pointer[func(src string)]

// BaseCopy says what LocalizeBase found or did.
type BaseCopy struct {
	Layer     string `json:"layer"`            // the base layer's id
	Path      string `json:"path"`             // the file its chains read now
	Origin    string `json:"origin,omitempty"` // the file a base in the store was copied from
	Size      int64  `json:"virtualSize"`
	Allocated int64  `json:"allocatedBytes"` // what Path takes on disk
	// Copied: this call copied the base into the store. When false, nothing was to do: the
	// base lies on the store's file system, or in the store already.
	Copied bool `json:"copied"`
}

// LocalizeBase copies the base under ref (a volume or snapshot name, or a base layer's id)
// into the store when it lies on another file system than the store, so that composed
// volumes share its blocks. The copy is sparse (a clone where the file systems allow it),
// of the same size, durable, and made without the store lock; one transaction then points
// the base's entry at it if the entry still exists and the source is the very file that was
// copied, unchanged (else the copy is discarded and ErrBaseChanged or ErrNotFound
// returned). A crash leaves at most a temp file in layers/, which the store's tidy-up
// removes. progress, if set, is told the bytes copied so far of the base's data.
func (s *Store) LocalizeBase(ref string, progress func(done, total int64)) (BaseCopy, error) {
	if err := ValidateName(ref); err != nil {
		return BaseCopy{}, err
	}
	m, release, err := s.read()
	if err != nil {
		return BaseCopy{}, err
	}
	id, err := m.baseOf(ref)
	var meta LayerMeta
	if err == nil {
		meta = *m.Layers[id]
	}
	release()
	if err != nil {
		return BaseCopy{}, err
	}
	res := BaseCopy{Layer: id, Path: s.filePath(id, &meta), Origin: meta.Origin, Size: meta.Size}
	if meta.inStore() {
		return res.allocated(), nil
	}
	src := meta.Path
	in, err := os.Open(src)
	if err != nil {
		return res, fmt.Errorf("localize base %s: %w: %w", src, ErrBaseChanged, err)
	}
	defer in.Close()
	var before unix.Stat_t
	if err := unix.Fstat(int(in.Fd()), &before); err != nil {
		return res, fmt.Errorf("localize base %s: %w", src, err)
	}
	fi, err := in.Stat()
	if err != nil {
		return res, fmt.Errorf("localize base %s: %w", src, err)
	}
	if err := baseChanged(src, fi, &meta); err != nil {
		return res, err
	}
	layers := filepath.Join(s.dir, "layers")
	var store unix.Stat_t
	if err := unix.Stat(layers, &store); err != nil {
		return res, fmt.Errorf("localize base %s: %w", src, err)
	}
	if before.Dev == store.Dev {
		return res.allocated(), nil
	}
	// Refuse at once what cannot fit, rather than after copying gigabytes (the copy takes
	// about what the source has allocated).
	var sfs unix.Statfs_t
	if err := unix.Statfs(layers, &sfs); err != nil {
		return res, fmt.Errorf("localize base %s: %w", src, err)
	}
	if need, free := before.Blocks*512, int64(sfs.Bavail)*sfs.Bsize; need > free {
		return res, fmt.Errorf("localize base %s: %w: it has %d bytes of data, the store %d bytes free", src, unix.ENOSPC, need, free)
	}

	// A leading dot: the tidy-up of a transaction leaves the file alone while it is being
	// written (it is young), and removes it an hour after a crash.
	tmp, err := os.CreateTemp(layers, "."+id+".localize-*")
	if err != nil {
		return res, fmt.Errorf("localize base %s: %w", src, err)
	}
	switched := false
	defer func() {
		tmp.Close()
		if !switched {
			os.Remove(tmp.Name())
		}
	}()
	var copyMTime int64
	err = clearExtentSizeHint(tmp) // the copy's extents follow the source's, not a hint's
	if err == nil {
		err = cloneInto(tmp, in, meta.Size, progress)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if err == nil {
		var cfi fs.FileInfo
		if cfi, err = tmp.Stat(); err == nil {
			copyMTime = cfi.ModTime().UnixNano()
		}
	}
	if err != nil {
		return res, fmt.Errorf("localize base %s: %w", src, err)
	}
	if h := localizeHook.Load(); h != nil {
		(*h)(src)
	}
	err = s.tx(func(m *manifest) error {
		l := m.Layers[id]
		switch {
		case l == nil:
			return fmt.Errorf("localize base %s: %w: no chain uses layer %s any more", src, ErrNotFound, id)
		case l.inStore(): // another process was quicker: its copy serves
			res.Path, res.Origin = s.layerPath(id), l.Origin
			return nil
		case *l != meta:
			return fmt.Errorf("localize base %s: %w: its entry changed meanwhile", src, ErrBaseChanged)
		}
		if err := sameFile(src, &before); err != nil {
			return err
		}
		dst := s.layerPath(id)
		if err := os.Rename(tmp.Name(), dst); err != nil {
			return fmt.Errorf("localize base %s: %w", src, err)
		}
		switched = true
		// Until the manifest names it, a crash leaves dst a stray file that the next
		// transaction removes.
		if err := syncDir(layers); err != nil {
			return fmt.Errorf("localize base %s: %w", src, err)
		}
		l.Path, l.MTime, l.Origin, l.OriginMTime = "", copyMTime, src, l.MTime
		res.Path, res.Origin, res.Copied = dst, src, true
		return nil
	})
	if err != nil {
		return res, err
	}
	return res.allocated(), nil
}

// baseOf returns the id of the base layer under ref: a volume's or snapshot's, or ref itself
// when it is the id of a base layer.
func (m *manifest) baseOf(ref string) (string, error) {
	if m.Volumes[ref] != nil || m.Snapshots[ref] != nil {
		ids, err := m.chainOf(ref)
		if err != nil {
			return "", err
		}
		if m.Layers[ids[0]].State != Base {
			return "", fmt.Errorf("%s: %w: its chain has no base", ref, ErrNotFound)
		}
		return ids[0], nil
	}
	if l := m.Layers[ref]; l != nil {
		if l.State != Base {
			return "", fmt.Errorf("layer %s: %w: it is %s, not a base", ref, ErrNotFound, l.State)
		}
		return ref, nil
	}
	return "", fmt.Errorf("%s: %w: no volume, snapshot or layer has this name", ref, ErrNotFound)
}

// sameFile fails with ErrBaseChanged unless the file at path is the one described by
// before, unchanged: same inode, size, modification and change times. The change time
// catches a rewrite whose modification time was set back.
func sameFile(path string, before *unix.Stat_t) error {
	var now unix.Stat_t
	err := unix.Stat(path, &now)
	if errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("localize base %s: %w: it was removed while it was copied", path, ErrBaseChanged)
	}
	if err != nil {
		return fmt.Errorf("localize base %s: %w", path, err)
	}
	if now.Dev != before.Dev || now.Ino != before.Ino || now.Size != before.Size || now.Mtim != before.Mtim || now.Ctim != before.Ctim {
		return fmt.Errorf("localize base %s: %w: it changed while it was copied", path, ErrBaseChanged)
	}
	return nil
}

// allocated fills in the space the base's file takes.
func (b BaseCopy) allocated() BaseCopy {
	var st unix.Stat_t
	if unix.Stat(b.Path, &st) == nil {
		b.Allocated = st.Blocks * 512
	}
	return b
}
