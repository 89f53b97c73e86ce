package cow_test

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// TestCloneOfWipedComposedVolume: a composed volume whose view is all zeros has an empty
// opaque top, which hides every layer under it. A clone of it, offline or live, must read
// zeros, not the data of the layers the empty top hides.
func TestCloneOfWipedComposedVolume(t *testing.T) {
	const size = 1 << 20
	st, err := cow.OpenStore(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("v", cow.CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	c, err := st.Open("v", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteAt(bytes.Repeat([]byte{1}, size), 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := st.Snapshot("v", "s", nil); err != nil {
		t.Fatal(err)
	}
	if err := st.Clone("s", "w", nil); err != nil {
		t.Fatal(err)
	}
	c, err = st.Open("w", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Discard(0, size); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := st.Compose("w"); err != nil {
		t.Fatal(err)
	}
	zeros := make([]byte, size)
	readsZeros := func(name string) {
		t.Helper()
		c, err := st.Open(name, cow.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		got := make([]byte, size)
		if _, err := c.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, zeros) {
			t.Errorf("%s reads data that its source's empty opaque top hides", name)
		}
	}
	readsZeros("w")
	if err := st.Clone("w", "offline", nil); err != nil {
		t.Fatal(err)
	}
	readsZeros("offline")
	live, err := st.Open("w", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Clone("w", "live", nil); err != nil {
		t.Fatal(err)
	}
	if err := live.Close(); err != nil {
		t.Fatal(err)
	}
	readsZeros("live")
}

// TestChangeVolumeOpenReadOnly: a volume open read-only in this process (attached read-only)
// can be snapshotted, cloned and grown by the same process: its shared lock keeps writers
// out, and it must not make the process's own changes fail as "open elsewhere". The open
// chain reads on as before; the snapshot and the clone hold the volume's data.
func TestChangeVolumeOpenReadOnly(t *testing.T) {
	st, err := cow.OpenStore(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("v", cow.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("ro data "), 512)
	w, err := st.Open("v", cow.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	ro, err := st.Open("v", cow.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := st.Snapshot("v", "s", nil); err != nil {
		t.Fatalf("snapshot of a volume open read-only: %v", err)
	}
	if err := st.Clone("v", "c", nil); err != nil {
		t.Fatalf("clone of a volume open read-only: %v", err)
	}
	if err := st.Resize("v", 2<<20); err != nil {
		t.Fatalf("grow a volume open read-only: %v", err)
	}
	if _, err := st.Open("v", cow.OpenOptions{}); !errors.Is(err, cow.ErrBusy) {
		t.Fatalf("a writer beside the reader: %v, want ErrBusy", err)
	}
	for _, name := range []string{"s", "c", "v-ro"} {
		var c *cow.Chain
		switch name {
		case "s":
			c, err = st.OpenSnapshot(name)
		case "c":
			c, err = st.Open(name, cow.OpenOptions{ReadOnly: true})
		default:
			c = ro
		}
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(data))
		if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
			t.Errorf("%s does not read the volume's data (%v)", name, err)
		}
		if c != ro {
			c.Close()
		}
	}
}
