package cow_test

import (
	"bytes"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// TestChangedComposed: between snapshots of a composed volume (FICLONEs of its top) the
// changed blocks come from the physical extents: exactly the blocks written in between,
// however much data the volume holds.
func TestChangedComposed(t *testing.T) {
	for _, kind := range []string{"xfs", "btrfs"} {
		t.Run(kind, func(t *testing.T) {
			st, err := cow.OpenStore(filepath.Join(testfs.Mount(t, kind, 1<<30), "store"))
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Create("vol", cow.CreateOptions{Size: 64 << 20}); err != nil {
				t.Fatal(err)
			}
			c, err := st.Open("vol", cow.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.WriteAt(bytes.Repeat([]byte{7}, 16<<20), 0); err != nil {
				t.Fatal(err)
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			release, err := st.Hold("vol")
			if err != nil {
				t.Fatal(err)
			}
			defer release()
			if err := st.Compose("vol"); err != nil {
				t.Fatal(err)
			}
			if err := st.Snapshot("vol", "s1", nil); err != nil {
				t.Fatal(err)
			}
			// What a loop device on the composed top would do: write the file.
			top, opaque, err := st.TopPath("vol")
			if err != nil || !opaque {
				t.Fatalf("top %s opaque=%v: %v", top, opaque, err)
			}
			f, err := os.OpenFile(top, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			written := []cow.Extent{{Off: 1 << 20, Len: 8192}, {Off: 20 << 20, Len: 4096}}
			for _, e := range written {
				if _, err := f.WriteAt(bytes.Repeat([]byte{9}, int(e.Len)), e.Off); err != nil {
					t.Fatal(err)
				}
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if err := st.Snapshot("vol", "s2", nil); err != nil {
				t.Fatal(err)
			}
			for _, pair := range [][2]string{{"s1", "s2"}, {"s1", "vol"}} {
				got, err := st.Changed(pair[0], pair[1])
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, written) {
					t.Errorf("changed between %s and %s: %v, want exactly %v", pair[0], pair[1], got, written)
				}
			}
			if got, err := st.Changed("s2", "vol"); err != nil || len(got) != 0 {
				t.Errorf("changed between s2 and vol, nothing written since: %v %v", got, err)
			}
		})
	}
}
