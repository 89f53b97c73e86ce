package main

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rawcow/csi-rawcow/internal/testfs"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// TestImageLocalizeBase: localize-base copies a base on another file system (ext4) into a
// store on xfs, with a progress bar on a terminal; the volumes over it read the same, share
// the copy, and the store checks clean; a second run has nothing to do.
func TestImageLocalizeBase(t *testing.T) {
	needTools(t)
	base := filepath.Join(testfs.Mount(t, "ext4", 64<<20), "base.raw")
	store := filepath.Join(testfs.Mount(t, "xfs", 300<<20), "store")
	content := writeSparse(t, base, 16*MiB, map[int64][]byte{0: pattern(4*MiB, 50), 12 * MiB: pattern(MiB, 51)})
	mustRun(t, store, "create", "--base", base, "vol", "32M")
	mustRun(t, store, "create", "--base", base, "vol2")
	writeVolume(t, store, "vol", func(c *cow.Chain) {
		if _, err := c.WriteAt(pattern(MiB, 52), 2*MiB); err != nil {
			t.Fatal(err)
		}
	})
	want := grow(content, 32*MiB)
	copy(want[2*MiB:], pattern(MiB, 52))
	flattenAndCompare(t, store, "vol", want)

	master, slave := openPTY(t)
	out := drain(master)
	cmd := exec.Command(binPath, "image", "--store", store, "localize-base", "vol")
	cmd.Env = testEnv
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, slave
	if err := cmd.Run(); err != nil {
		t.Fatalf("localize-base: %v", err)
	}
	slave.Close()
	if tty := receive(t, out); !strings.Contains(tty, "copy the base of vol") || !strings.Contains(tty, "100%") {
		t.Fatalf("no progress bar on the terminal: %q", tty)
	}
	if s := stdout.String(); !strings.HasPrefix(s, "copied base "+base+" into the store as "+store+"/layers/") || strings.Count(s, "\n") != 1 {
		t.Fatalf("stdout: %q", s)
	}

	info := infoOf(t, store, "vol")
	b := info.Layers[0]
	if b.State != cow.Base || b.Origin != base || filepath.Dir(b.Path) != filepath.Join(store, "layers") {
		t.Fatalf("the base layer after localize-base: %+v", b)
	}
	if info2 := infoOf(t, store, "vol2"); info2.Layers[0].ID != b.ID {
		t.Fatalf("vol2 rests on %s, not on the copy %s", info2.Layers[0].ID, b.ID)
	}
	if !strings.Contains(mustRun(t, store, "info", "vol"), "base origin:   "+base+" (copied into the store)") {
		t.Error("info does not say where the base was copied from")
	}
	flattenAndCompare(t, store, "vol", want)
	flattenAndCompare(t, store, "vol2", content)
	if got, err := os.ReadFile(base); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("the external base changed: %v", err)
	}
	if out := mustRun(t, store, "check"); !strings.Contains(out, "No errors were found") {
		t.Fatalf("check: %s", out)
	}

	// Again, by the other volume, and by the layer's id: nothing to do.
	again := decode[cow.BaseCopy](t, mustRun(t, store, "localize-base", "--json", "vol2"))
	if again.Copied || again.Origin != base || again.Path != b.Path || again.Layer != b.ID {
		t.Fatalf("localize-base --json vol2 after vol: %+v", again)
	}
	if s := mustRun(t, store, "localize-base", b.ID); !strings.Contains(s, "copied into the store already") {
		t.Fatalf("localize-base LAYER: %q", s)
	}
	mustRun(t, store, "create", "plain", "1M")
	mustFail(t, store, 1, "its chain has no base", "localize-base", "plain")
	mustFail(t, store, 1, "not found", "localize-base", "nope")
	mustFail(t, store, 2, "missing arguments", "localize-base")

	// The copy goes with the last chain on it, and delete counts it.
	if out := mustRun(t, store, "delete", "vol"); !strings.Contains(out, "layers freed: 1, merged into other chains: 0, still used: 1") {
		t.Fatalf("delete vol said %q", out)
	}
	if out := mustRun(t, store, "delete", "vol2"); !strings.Contains(out, "layers freed: 2, merged into other chains: 0, still used: 0") {
		t.Fatalf("delete vol2 said %q", out)
	}
	if _, err := os.Stat(b.Path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the base's copy %s is still there: %v", b.Path, err)
	}
}
