package blockdev_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/internal/testsrv"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// writeSparseBase writes a base of size bytes at path with data (byte i of part k reads
// byte(i>>12)+k) in the given ranges, holes elsewhere, and returns its content.
func writeSparseBase(t *testing.T, path string, size int64, parts ...[2]int64) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	content := make([]byte, size)
	for k, p := range parts {
		for i := p[0]; i < p[0]+p[1]; i++ {
			content[i] = byte(i>>12) + byte(k)
		}
		if _, err := f.WriteAt(content[p[0]:p[0]+p[1]], p[0]); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return content
}

// TestAttachOverFarBase: on a store that shares blocks, a volume over a base on another file
// system (ext4) is composed, not served merged: the base is copied into the store once, at
// the first attach, and every volume over it composes over the copy.
func TestAttachOverFarBase(t *testing.T) {
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) {
			base := filepath.Join(testfs.Mount(t, "ext4", 128<<20), "base.raw")
			content := writeSparseBase(t, base, 32<<20, [2]int64{0, 8 << 20}, [2]int64{20 << 20, 4 << 20})
			st, err := cow.OpenStore(filepath.Join(testfs.Mount(t, kind, 1<<30), "store"))
			if err != nil {
				t.Fatal(err)
			}
			const size = 48 << 20
			if err := st.Create("vol", cow.CreateOptions{Base: base, Size: size}); err != nil {
				t.Fatal(err)
			}
			srv := testsrv.Start(t, st, t.TempDir())
			want := append(bytes.Clone(content), make([]byte, size-len(content))...)

			// Written through the merged view first: the top holds data over the base.
			a, err := srv.Attach("vol", blockdev.AttachOptions{Presentation: blockdev.PresentMerged})
			if err != nil || a.Composed {
				t.Fatalf("merged attach: composed=%v, %v", a.Composed, err)
			}
			chunk := bytes.Repeat([]byte{0xc1}, 1<<20)
			testsrv.WriteDevice(t, a.Device, chunk, 2<<20)
			copy(want[2<<20:], chunk)
			if err := srv.Detach("vol"); err != nil {
				t.Fatal(err)
			}

			a, err = srv.Attach("vol", blockdev.AttachOptions{Presentation: blockdev.PresentAuto})
			if err != nil {
				t.Fatal(err)
			}
			if !a.Composed {
				t.Fatal("auto over a base on another file system served the merged view")
			}
			if got := testsrv.ReadDevice(t, a.Device, 0, size); !bytes.Equal(got, want) {
				t.Fatal("the composed volume does not read what the merged view read")
			}
			chunk = bytes.Repeat([]byte{0xc2}, 1<<20)
			testsrv.WriteDevice(t, a.Device, chunk, 21<<20)
			copy(want[21<<20:], chunk)
			if got := testsrv.ReadDevice(t, a.Device, 20<<20, 4<<20); !bytes.Equal(got, want[20<<20:24<<20]) {
				t.Fatal("the composed volume does not read back what was written")
			}
			if err := srv.Detach("vol"); err != nil {
				t.Fatal(err)
			}
			info, err := st.Info("vol")
			if err != nil {
				t.Fatal(err)
			}
			b := info.Layers[0]
			if b.Origin != base || !strings.HasPrefix(b.Path, st.Dir()+"/") {
				t.Fatalf("the volume's base is %+v, want a copy in the store of %s", b, base)
			}

			// A second volume over the base composes over the same copy.
			if err := st.Create("vol2", cow.CreateOptions{Base: base}); err != nil {
				t.Fatal(err)
			}
			a, err = srv.Attach("vol2", blockdev.AttachOptions{Presentation: blockdev.PresentComposed})
			if err != nil || !a.Composed {
				t.Fatalf("composed attach of a second volume: composed=%v, %v", a.Composed, err)
			}
			if got := testsrv.ReadDevice(t, a.Device, 0, int64(len(content))); !bytes.Equal(got, content) {
				t.Fatal("the second volume does not read the base")
			}
			if err := srv.Detach("vol2"); err != nil {
				t.Fatal(err)
			}
			if info2, err := st.Info("vol2"); err != nil || info2.Layers[0].ID != b.ID {
				t.Fatalf("vol2 rests on %+v (%v), want the copy %s", info2.Layers[0], err, b.ID)
			}
			if got, err := os.ReadFile(base); err != nil || !bytes.Equal(got, content) {
				t.Fatalf("the external base changed: %v", err)
			}
		})
	}
}

// TestAttachOverFarBaseNoSpace: when the base cannot be copied into the store (it does not
// fit), auto serves the merged view and composed fails saying why; no copy is left behind.
func TestAttachOverFarBaseNoSpace(t *testing.T) {
	base := filepath.Join(testfs.Mount(t, "ext4", 640<<20), "big.raw")
	const size = 400 << 20 // more than the store's 300 MiB file system holds
	f, err := os.Create(base)
	if err != nil {
		t.Fatal(err)
	}
	block := bytes.Repeat([]byte("big base"), 1<<17) // 1 MiB
	for off := int64(0); off < size; off += int64(len(block)) {
		if _, err := f.WriteAt(block, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := cow.OpenStore(filepath.Join(testfs.Mount(t, "xfs", 300<<20), "store"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("vol", cow.CreateOptions{Base: base}); err != nil {
		t.Fatal(err)
	}
	layers, err := os.ReadDir(filepath.Join(st.Dir(), "layers"))
	if err != nil {
		t.Fatal(err)
	}
	srv := testsrv.Start(t, st, t.TempDir())
	a, err := srv.Attach("vol", blockdev.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if a.Composed {
		t.Fatal("auto composed a volume whose base could not be copied")
	}
	if got := testsrv.ReadDevice(t, a.Device, size-(1<<20), 1<<20); !bytes.Equal(got, block) {
		t.Fatal("the merged view does not read the base")
	}
	if err := srv.Detach("vol"); err != nil {
		t.Fatal(err)
	}
	// refused before copying anything ("bytes free": the free-space check, not ENOSPC mid-copy)
	if _, err := srv.Attach("vol", blockdev.AttachOptions{Presentation: blockdev.PresentComposed}); err == nil ||
		!strings.Contains(err.Error(), "no space left") || !strings.Contains(err.Error(), base) || !strings.Contains(err.Error(), "bytes free") {
		t.Fatalf("composed attach over a base that does not fit: %v, want ENOSPC naming %s, found before copying", err, base)
	}
	after, err := os.ReadDir(filepath.Join(st.Dir(), "layers"))
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(layers) {
		t.Fatalf("layers/ holds %d files after the failed copies, %d before", len(after), len(layers))
	}
	if info, err := st.Info("vol"); err != nil || info.Layers[0].Path != base {
		t.Fatalf("the volume's base: %+v %v, want %s still", info.Layers[0], err, base)
	}
}
