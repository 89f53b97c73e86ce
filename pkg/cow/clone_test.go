package cow_test

import (
	"bytes"
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
