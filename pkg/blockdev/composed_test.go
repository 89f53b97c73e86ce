package blockdev_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/internal/testsrv"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// TestMixedPresentations attaches one volume merged, composed and merged again on reflink
// file systems, writing each time: every attachment reads what all earlier ones wrote.
func TestMixedPresentations(t *testing.T) {
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) {
			dir := testfs.Mount(t, kind, 2<<30)
			st, err := cow.OpenStore(filepath.Join(dir, "store"))
			if err != nil {
				t.Fatal(err)
			}
			base := filepath.Join(dir, "base.raw")
			writeFile(t, base, bytes.Repeat([]byte("base"), 4<<20))
			if err := st.Create("vol", cow.CreateOptions{Base: base, Size: 64 << 20}); err != nil {
				t.Fatal(err)
			}
			srv := testsrv.Start(t, st, t.TempDir())
			want := bytes.Repeat([]byte("base"), 4<<20)
			want = append(want, make([]byte, 64<<20-len(want))...)
			var atSnapshot []byte
			for i, p := range []string{blockdev.PresentMerged, blockdev.PresentComposed, blockdev.PresentMerged, blockdev.PresentComposed} {
				a, err := srv.Attach("vol", blockdev.AttachOptions{Presentation: p})
				if err != nil {
					t.Fatal(err)
				}
				if a.Composed != (p == blockdev.PresentComposed) {
					t.Fatalf("asked for %s, got composed=%v", p, a.Composed)
				}
				if got := testsrv.ReadDevice(t, a.Device, 0, 64<<20); !bytes.Equal(got, want) {
					t.Fatalf("attachment %d (%s) does not read what earlier ones wrote", i, p)
				}
				chunk := bytes.Repeat([]byte{byte('a' + i)}, 1<<20)
				off := int64(i) * 3 << 20
				testsrv.WriteDevice(t, a.Device, chunk, off)
				copy(want[off:], chunk)
				if i == 1 { // a live FICLONE snapshot of the composed volume
					if err := srv.Snapshot("vol", "snap", nil); err != nil {
						t.Fatal(err)
					}
					atSnapshot = bytes.Clone(want)
				}
				if err := srv.Detach("vol"); err != nil {
					t.Fatal(err)
				}
			}
			snap, err := st.OpenSnapshot("snap")
			if err != nil {
				t.Fatal(err)
			}
			defer snap.Close()
			got := make([]byte, len(atSnapshot))
			if _, err := snap.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, atSnapshot) {
				t.Fatal("the snapshot of the composed volume does not hold exactly the writes before it")
			}
			// A base on another file system is copied into the store, and then composed.
			other := filepath.Join(t.TempDir(), "other-base.raw")
			writeFile(t, other, []byte("elsewhere"))
			if err := st.Create("far", cow.CreateOptions{Base: other, Size: 16 << 20}); err != nil {
				t.Fatal(err)
			}
			a, err := srv.Attach("far", blockdev.AttachOptions{Presentation: blockdev.PresentComposed})
			if err != nil || !a.Composed {
				t.Fatalf("composing over a base on another file system: composed=%v, %v", a.Composed, err)
			}
			if got := testsrv.ReadDevice(t, a.Device, 0, 4096); !bytes.Equal(got[:9], []byte("elsewhere")) || !bytes.Equal(got[9:], make([]byte, 4096-9)) {
				t.Fatalf("the composed volume over a copied base reads %q", got[:16])
			}
			if err := srv.Detach("far"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestGroupSnapshotComposed: a group snapshot takes one volume attached composed beside
// merged ones (the merged ones stand still while it is cloned), and refuses two composed
// ones, whose writes it cannot stop at one instant, with ErrBusy, changing nothing.
func TestGroupSnapshotComposed(t *testing.T) {
	dir := testfs.Mount(t, "xfs", 1<<30)
	st, err := cow.OpenStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	srv := testsrv.Start(t, st, t.TempDir())
	before := bytes.Repeat([]byte("before! "), 8192)
	devs := map[string]string{}
	for name, p := range map[string]string{"m": blockdev.PresentMerged, "c1": blockdev.PresentComposed, "c2": blockdev.PresentComposed} {
		if err := st.Create(name, cow.CreateOptions{Size: 16 << 20}); err != nil {
			t.Fatal(err)
		}
		a, err := srv.Attach(name, blockdev.AttachOptions{Presentation: p})
		if err != nil {
			t.Fatal(err)
		}
		if a.Composed != (p == blockdev.PresentComposed) {
			t.Fatalf("%s: asked for %s, got composed=%v", name, p, a.Composed)
		}
		testsrv.WriteDevice(t, a.Device, before, 0)
		devs[name] = a.Device
	}
	err = srv.SnapshotGroup([]string{"m", "c1", "c2"}, []string{"m-s", "c1-s", "c2-s"}, nil)
	if !errors.Is(err, cow.ErrBusy) || !strings.Contains(err.Error(), "composed") {
		t.Fatalf("group of two composed volumes: %v, want ErrBusy saying why", err)
	}
	if snaps, err := st.Snapshots(); err != nil || len(snaps) > 0 {
		t.Fatalf("a refused group left snapshots %v (%v)", snaps, err)
	}
	if err := srv.SnapshotGroup([]string{"m", "c1"}, []string{"m-s", "c1-s"}, nil); err != nil {
		t.Fatalf("group of a merged and a composed volume: %v", err)
	}
	after := bytes.Repeat([]byte("after!! "), 8192)
	for _, name := range []string{"m", "c1"} {
		testsrv.WriteDevice(t, devs[name], after, 0)
	}
	for _, snap := range []string{"m-s", "c1-s"} {
		c, err := st.OpenSnapshot(snap)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(before))
		_, err = c.ReadAt(got, 0)
		c.Close()
		if err != nil || !bytes.Equal(got, before) {
			t.Errorf("%s does not hold the writes before the group snapshot (%v)", snap, err)
		}
	}
	for name := range devs {
		if err := srv.Detach(name); err != nil {
			t.Fatal(err)
		}
	}
}
