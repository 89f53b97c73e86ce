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

// TestNewStoreWritesManifest: a new store gets its (empty) manifest at once, so that a crash
// between the first transaction's layer file and its manifest leaves a stray file to tidy,
// not a store that looks as if it had lost its manifest.
func TestNewStoreWritesManifest(t *testing.T) {
	dir := t.TempDir()
	if _, err := cow.OpenStore(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "manifest.json")); err != nil {
		t.Fatalf("new store: %v", err)
	}
	// the crash: a first CreateVolume made its layer file and died before committing
	stray := filepath.Join(dir, "layers", "0123456789abcdef0123456789abcdef.raw")
	if err := os.WriteFile(stray, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := cow.OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create("v", cow.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatalf("create after the crash: %v", err)
	}
	if err := st.WaitTrash(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stray); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the crashed transaction's layer file is still there: %v", err)
	}
}
