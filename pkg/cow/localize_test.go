package cow

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/internal/testfs"
)

// setLocalizeHook installs fn as the localize hook for the test's duration.
func setLocalizeHook(t *testing.T, fn func(src string)) {
	t.Helper()
	localizeHook.Store(&fn)
	t.Cleanup(func() { localizeHook.Store(nil) })
}

// farBaseSize is the size of the test bases: not a whole number of blocks.
const farBaseSize = 24*mib + 1000

// writeFarBase writes a sparse base of farBaseSize at path: data at [0, 4M), [8M, 10M) and in
// the partial last block, holes elsewhere. It returns the content.
func writeFarBase(t *testing.T, path string) []byte {
	t.Helper()
	content := make([]byte, farBaseSize)
	for i := range content[:4*mib] {
		content[i] = byte(i*7 + i>>12)
	}
	for i := 8 * mib; i < 10*mib; i++ {
		content[i] = byte(i>>9) | 0x80
	}
	copy(content[24*mib:], bytes.Repeat([]byte("tail"), 250))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(farBaseSize); err != nil {
		t.Fatal(err)
	}
	for _, r := range []Extent{{0, 4 * mib}, {8 * mib, 2 * mib}, {24 * mib, 1000}} {
		if _, err := f.WriteAt(content[r.Off:r.End()], r.Off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return content
}

// viewOf exports name (its merged view) and returns the bytes.
func viewOf(t *testing.T, st *Store, name string) []byte {
	t.Helper()
	dst := filepath.Join(t.TempDir(), name+".raw")
	if err := st.Export(name, dst, nil); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func statOf(t *testing.T, path string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func manifestBytes(t *testing.T, st *Store) []byte {
	t.Helper()
	data, err := os.ReadFile(st.manifestPath())
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// layerFiles lists layers/, temp files included.
func layerFiles(t *testing.T, st *Store) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(st.Dir(), "layers"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func mustCheck(t *testing.T, st *Store) {
	t.Helper()
	probs, err := st.Check(false)
	if err != nil || len(probs) > 0 {
		t.Fatalf("check: %v %v", probs, err)
	}
}

// TestLocalizeBase: chains over a base on ext4, in a store on xfs or btrfs. LocalizeBase
// copies the base into the store once, sparsely; every chain reads what it read before and
// shares the one copy; the external file is untouched; composing then shares the copy's
// blocks; deleting the last chain frees the copy, never the external file.
func TestLocalizeBase(t *testing.T) {
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) {
			base := filepath.Join(testfs.Mount(t, "ext4", 64<<20), "base.raw")
			st, err := OpenStore(filepath.Join(testfs.Mount(t, kind, 1<<30), "store"))
			if err != nil {
				t.Fatal(err)
			}
			content := writeFarBase(t, base)
			if err := st.Create("vol", CreateOptions{Base: base, Size: 32 * mib}); err != nil {
				t.Fatal(err)
			}
			c, err := st.Open("vol", OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range []struct {
				off int64
				p   []byte
			}{{1 * mib, bytes.Repeat([]byte{0xa1}, int(mib))}, {16 * mib, bytes.Repeat([]byte{0xa2}, 512<<10)}, {24*mib + 512, []byte("over the tail")}} {
				if _, err := c.WriteAt(w.p, w.off); err != nil {
					t.Fatal(err)
				}
			}
			if err := c.WriteZeroes(8*mib, 64<<10); err != nil { // a zero-list entry over base data
				t.Fatal(err)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			if err := st.Snapshot("vol", "snap", nil); err != nil {
				t.Fatal(err)
			}
			if err := st.Clone("snap", "clone", nil); err != nil {
				t.Fatal(err)
			}
			if err := st.Create("plain", CreateOptions{Base: base}); err != nil {
				t.Fatal(err)
			}
			names := []string{"vol", "snap", "clone", "plain"}
			want := map[string][]byte{}
			for _, n := range names {
				want[n] = viewOf(t, st, n)
			}
			if !bytes.Equal(want["plain"][:farBaseSize], content) {
				t.Fatal("a volume over the base does not read the base")
			}
			before := statOf(t, base)
			var calls int
			var last [2]int64
			res, err := st.LocalizeBase("vol", func(done, total int64) { calls++; last = [2]int64{done, total} })
			if err != nil {
				t.Fatal(err)
			}
			info, err := st.Info("vol")
			if err != nil {
				t.Fatal(err)
			}
			b := info.Layers[0]
			if !res.Copied || res.Origin != base || res.Layer != b.ID || res.Path != st.layerPath(b.ID) || res.Size != farBaseSize {
				t.Fatalf("LocalizeBase = %+v; want the base %s copied to %s", res, base, st.layerPath(b.ID))
			}
			if b.State != Base || b.Path != res.Path || b.Origin != base {
				t.Fatalf("after LocalizeBase the base layer is %+v, want a base at %s from %s", b, res.Path, base)
			}
			const data = 6*mib + 1000 // what the base holds (its last block ends with the file)
			if calls < 2 || last != [2]int64{data, data} {
				t.Errorf("progress: %d calls, last %v; want it to end at %d of %d", calls, last, data, data)
			}
			for _, n := range names {
				in, err := st.Info(n)
				if err != nil {
					t.Fatal(err)
				}
				if in.Layers[0].ID != b.ID {
					t.Errorf("%s rests on layer %s, not on the one copy %s", n, in.Layers[0].ID, b.ID)
				}
				if got := viewOf(t, st, n); !bytes.Equal(got, want[n]) {
					t.Errorf("%s reads other bytes after LocalizeBase (first difference at %d)", n, firstDifference(got, want[n]))
				}
			}
			// The external file is the same file, unchanged.
			if after := statOf(t, base); after.Ino != before.Ino || after.Size != before.Size || after.Mtim != before.Mtim || after.Ctim != before.Ctim {
				t.Errorf("the external base changed: %+v, was %+v", after, before)
			}
			if got, err := os.ReadFile(base); err != nil || !bytes.Equal(got, content) {
				t.Errorf("the external base does not hold what it held: %v", err)
			}
			// The copy: the base's bytes, its size, about its allocation (not its size).
			if got, err := os.ReadFile(res.Path); err != nil || !bytes.Equal(got, content) {
				t.Errorf("the copy does not hold the base's bytes: %v", err)
			}
			srcAlloc, copyAlloc := before.Blocks*512, statOf(t, res.Path).Blocks*512
			if copyAlloc > srcAlloc+mib || copyAlloc < data || res.Allocated != copyAlloc {
				t.Errorf("the copy takes %d bytes (reported %d), the source %d: want it sparse like the source", copyAlloc, res.Allocated, srcAlloc)
			}
			mustCheck(t, st)

			// A second call, by any name over the base or by its id, is a no-op.
			m := manifestBytes(t, st)
			for _, ref := range []string{"clone", b.ID} {
				again, err := st.LocalizeBase(ref, nil)
				if err != nil || again.Copied || again.Path != res.Path || again.Origin != base {
					t.Fatalf("LocalizeBase(%s) again = %+v, %v; want nothing done", ref, again, err)
				}
			}
			if !bytes.Equal(manifestBytes(t, st), m) {
				t.Error("a second LocalizeBase changed the manifest")
			}
			// A new volume over the unchanged external file builds on the copy.
			if err := st.Create("later", CreateOptions{Base: base}); err != nil {
				t.Fatal(err)
			}
			if in, err := st.Info("later"); err != nil || in.Layers[0].ID != b.ID {
				t.Fatalf("a volume created over %s after the copy: %+v %v; want it on layer %s", base, in, err, b.ID)
			}

			// Composing shares the copy's blocks, and reads the same.
			if err := st.Compose("vol"); err != nil {
				t.Fatal(err)
			}
			if got := viewOf(t, st, "vol"); !bytes.Equal(got, want["vol"]) {
				t.Errorf("the composed volume reads other bytes (first difference at %d)", firstDifference(got, want["vol"]))
			}
			top, opaque, err := st.TopPath("vol")
			if err != nil || !opaque {
				t.Fatalf("top %s, opaque %v: %v", top, opaque, err)
			}
			if shared := sharedBytes(t, res.Path, top, farBaseSize); shared < 4*mib {
				t.Errorf("the composed top shares %d bytes with the copied base, want the base's untouched data (>= 4 MiB)", shared)
			}
			mustCheck(t, st)

			// The copy goes with the last chain over it; the external file stays.
			for _, n := range []string{"vol", "clone", "plain", "later"} {
				if err := st.DeleteVolume(n); err != nil {
					t.Fatal(err)
				}
				if _, err := os.Stat(res.Path); err != nil {
					t.Fatalf("the copy is gone while snap still needs it: %v", err)
				}
			}
			if err := st.DeleteSnapshot("snap"); err != nil {
				t.Fatal(err)
			}
			if err := st.WaitTrash(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(res.Path); !os.IsNotExist(err) {
				t.Errorf("the copy %s outlived its last chain: %v", res.Path, err)
			}
			if files := layerFiles(t, st); len(files) > 0 {
				t.Errorf("layers/ still holds %v", files)
			}
			if entries, _ := os.ReadDir(st.trashDir()); len(entries) > 0 {
				t.Errorf("the trash still holds %d entries", len(entries))
			}
			if got, err := os.ReadFile(base); err != nil || !bytes.Equal(got, content) {
				t.Errorf("the external base is not what it was: %v", err)
			}
			mustCheck(t, st)
		})
	}
}

// sharedBytes returns how many bytes of a and b below size are the same physical blocks.
func sharedBytes(t *testing.T, a, b string, size int64) int64 {
	t.Helper()
	var n int64
	for _, e := range sharedRanges(physOf(t, a, size), physOf(t, b, size)) {
		n += e.Len
	}
	return n
}

func firstDifference(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestLocalizeBaseNothingToDo: a base on the store's file system is left where it is, a
// chain without a base or an unknown name is refused; the manifest does not change.
func TestLocalizeBaseNothingToDo(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "base.raw")
	writeFarBase(t, base)
	if err := st.Create("vol", CreateOptions{Base: base}); err != nil {
		t.Fatal(err)
	}
	if err := st.Create("empty", CreateOptions{Size: mib}); err != nil {
		t.Fatal(err)
	}
	m := manifestBytes(t, st)
	res, err := st.LocalizeBase("vol", nil)
	if err != nil || res.Copied || res.Path != base || res.Origin != "" {
		t.Fatalf("LocalizeBase of a base on the store's file system = %+v, %v; want nothing done", res, err)
	}
	info, err := st.Info("vol")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ref  string
		want error
	}{{"empty", ErrNotFound}, {"nope", ErrNotFound}, {info.Layers[1].ID, ErrNotFound}, {"../x", ErrInvalidName}} {
		if _, err := st.LocalizeBase(tc.ref, nil); !errors.Is(err, tc.want) {
			t.Errorf("LocalizeBase(%s): %v, want %v", tc.ref, err, tc.want)
		}
	}
	if !bytes.Equal(manifestBytes(t, st), m) {
		t.Error("the manifest changed")
	}
	if files := layerFiles(t, st); len(files) != 2 {
		t.Errorf("layers/ holds %v, want the two tops", files)
	}
}

// TestLocalizeBaseSourceChanged: when the source changes, goes, or its chains go while it is
// copied, LocalizeBase fails, leaves the manifest as it was and removes its copy.
func TestLocalizeBaseSourceChanged(t *testing.T) {
	far := testfs.Mount(t, "ext4", 256<<20)
	storeFS := testfs.Mount(t, "xfs", 300<<20)
	for i, tc := range []struct {
		name   string
		change func(t *testing.T, st *Store, src string)
		want   error
	}{
		{"grown", func(t *testing.T, st *Store, src string) {
			if err := os.Truncate(src, farBaseSize+mib); err != nil {
				t.Fatal(err)
			}
		}, ErrBaseChanged},
		{"rewritten with its time set back", func(t *testing.T, st *Store, src string) {
			fi, err := os.Stat(src)
			if err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(src, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt([]byte("changed"), 0)
			f.Close()
			if err := os.Chtimes(src, fi.ModTime(), fi.ModTime()); err != nil {
				t.Fatal(err)
			}
		}, ErrBaseChanged},
		{"replaced", func(t *testing.T, st *Store, src string) {
			data, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(src+".new", data, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(src+".new", src); err != nil {
				t.Fatal(err)
			}
		}, ErrBaseChanged},
		{"removed", func(t *testing.T, st *Store, src string) {
			if err := os.Remove(src); err != nil {
				t.Fatal(err)
			}
		}, ErrBaseChanged},
		{"unused", func(t *testing.T, st *Store, src string) {
			if err := st.DeleteVolume("vol"); err != nil {
				t.Fatal(err)
			}
		}, ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := filepath.Join(far, tc.name+".raw")
			writeFarBase(t, base)
			st, err := OpenStore(filepath.Join(storeFS, "store"+string(rune('0'+i))))
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Create("vol", CreateOptions{Base: base}); err != nil {
				t.Fatal(err)
			}
			m := manifestBytes(t, st)
			files := layerFiles(t, st)
			setLocalizeHook(t, func(src string) {
				// The copy exists, unknown to the manifest, and neither check nor a
				// transaction's tidy-up takes it for a leftover while it is young.
				if err := st.Collect(); err != nil {
					t.Error(err)
				}
				if n := len(layerFiles(t, st)); n != len(files)+1 {
					t.Errorf("during the copy layers/ holds %v", layerFiles(t, st))
				}
				if tc.name != "unused" {
					mustCheck(t, st)
				}
				tc.change(t, st, src)
			})
			_, err = st.LocalizeBase("vol", nil)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), base) {
				t.Fatalf("LocalizeBase with the source %s meanwhile: %v, want %v naming %s", tc.name, err, tc.want, base)
			}
			if tc.name == "unused" {
				return // the deletion changed the manifest
			}
			if !bytes.Equal(manifestBytes(t, st), m) {
				t.Error("the manifest changed")
			}
			if got := layerFiles(t, st); strings.Join(got, " ") != strings.Join(files, " ") {
				t.Errorf("layers/ holds %v, want %v (the copy removed)", got, files)
			}
		})
	}
}

// TestLocalizeBaseLeftovers: what a crash can leave of LocalizeBase is tidied away: a temp
// copy once it is old, and a copy renamed into place whose commit never came; the external
// file is not touched.
func TestLocalizeBaseLeftovers(t *testing.T) {
	dir := t.TempDir()
	st, err := OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(dir, "base.raw")
	content := writeFarBase(t, base)
	if err := st.Create("vol", CreateOptions{Base: base}); err != nil {
		t.Fatal(err)
	}
	info, err := st.Info("vol")
	if err != nil {
		t.Fatal(err)
	}
	id := info.Layers[0].ID
	young := filepath.Join(st.Dir(), "layers", "."+id+".localize-young")
	old := filepath.Join(st.Dir(), "layers", "."+id+".localize-old")
	renamed := st.layerPath(id) // renamed, but the manifest still names the external file
	for _, p := range []string{young, old, renamed} {
		if err := os.WriteFile(p, content, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ago := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(old, ago, ago); err != nil {
		t.Fatal(err)
	}
	probs, err := st.Check(false)
	if err != nil || len(probs) != 2 {
		t.Fatalf("check: %v %v; want the old temp file and the uncommitted copy reported", probs, err)
	}
	if err := st.Collect(); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]bool{young: true, old: false, renamed: false, base: true} {
		if _, err := os.Stat(p); (err == nil) != want {
			t.Errorf("%s: exists %v, want %v", p, err == nil, want)
		}
	}
	if got := viewOf(t, st, "vol"); !bytes.Equal(got[:farBaseSize], content) {
		t.Error("the volume does not read its base")
	}
	// RemoveBase never removes a file of the store.
	if err := st.RemoveBase(young); !errors.Is(err, ErrInvalidName) {
		t.Errorf("RemoveBase of a file in the store: %v, want ErrInvalidName", err)
	}
	if _, err := os.Stat(young); err != nil {
		t.Error(err)
	}
}
