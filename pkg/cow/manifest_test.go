package cow_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// TestMissingManifest: a store whose manifest is gone is refused, and its layers stay.
func TestMissingManifest(t *testing.T) {
	dir := t.TempDir()
	st, err := cow.OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("v", cow.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "manifest.json")); err != nil {
		t.Fatal(err)
	}
	before, _ := filepath.Glob(filepath.Join(dir, "layers", "*.raw"))
	if err := st.Create("w", cow.CreateOptions{Size: 1 << 20}); !errors.Is(err, cow.ErrCorrupt) {
		t.Fatalf("create in a store without its manifest: %v, want ErrCorrupt", err)
	}
	after, _ := filepath.Glob(filepath.Join(dir, "layers", "*.raw"))
	if len(after) != len(before) || len(before) != 1 {
		t.Fatalf("layer files before %v, after %v", before, after)
	}
}
