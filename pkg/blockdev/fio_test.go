package blockdev_test

import (
	"bytes"
	"fmt"
	"strconv"
	"testing"

	"github.com/rawcow/csi-rawcow/internal/testsrv"
	"github.com/rawcow/csi-rawcow/pkg/blockdev"
	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// makeChain creates volume "vol" over a base, with depth-1 frozen layers above the base,
// each holding scattered writes, and returns the store.
func makeChain(t testing.TB, depth int) *cow.Store {
	t.Helper()
	st := storeWithVolume(t, cow.CreateOptions{Base: makeBase(t, t.TempDir(), 96<<20), Size: 256 << 20})
	block := bytes.Repeat([]byte{0xa5}, cow.BlockSize)
	for layer := 1; layer < depth; layer++ {
		c, err := st.Open("vol", cow.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 64; i++ {
			off := int64((layer*7919+i*104729)%(256<<20/cow.BlockSize)) * cow.BlockSize
			if _, err := c.WriteAt(block, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.Snapshot(fmt.Sprintf("s%d", layer), nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return st
}

func fio(t testing.TB, dev string, offset, size int64, extra ...string) string {
	t.Helper()
	args := append([]string{"--name=verify", "--filename=" + dev, "--ioengine=libaio", "--direct=1",
		"--iodepth=16", "--rw=randwrite", "--bsrange=4k-1m", "--randrepeat=1", "--randseed=42",
		"--offset=" + strconv.FormatInt(offset, 10), "--size=" + strconv.FormatInt(size, 10),
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
		// fio would save its verify state into the working directory: the package's source.
		"--verify_state_save=0"}, extra...)
	return run(t, "fio", args...)
}

// TestFioVerify writes random blocks with checksums through the loop device, verifies them,
// discards ranges and checks they read zero while the rest still verifies.
func TestFioVerify(t *testing.T) {
	requireTools(t, "fio", "blkdiscard")
	for _, tc := range []struct {
		depth     int
		transport string
	}{{1, blockdev.TransportIOUring}, {16, blockdev.TransportIOUring}, {16, blockdev.TransportDevFuse}} {
		depth := tc.depth
		t.Run(fmt.Sprintf("depth=%d/%s", depth, tc.transport), func(t *testing.T) {
			st := makeChain(t, depth)
			srv := testsrv.StartWith(t, st, t.TempDir(), blockdev.Options{Transport: tc.transport})
			a, err := srv.Attach("vol", blockdev.AttachOptions{})
			if err != nil {
				t.Fatal(err)
			}
			const region = 64 << 20
			fio(t, a.Device, 0, region)
			fio(t, a.Device, region, region)
			// Discard the second region in unaligned-to-the-layers pieces, over base data too.
			for _, r := range [][2]int64{{region, 8 << 20}, {region + 9<<20, 4096}, {region + 12<<20, region - 12<<20}} {
				run(t, "blkdiscard", "-o", strconv.FormatInt(r[0], 10), "-l", strconv.FormatInt(r[1], 10), a.Device)
				got := testsrv.ReadDevice(t, a.Device, r[0], r[1])
				if i := bytes.IndexFunc(got, func(r rune) bool { return r != 0 }); i >= 0 {
					t.Fatalf("discarded [%d,+%d) reads non-zero at %d", r[0], r[1], r[0]+int64(i))
				}
			}
			fio(t, a.Device, 0, region, "--verify_only")
			if err := srv.Detach("vol"); err != nil {
				t.Fatal(err)
			}
			// After reopening, the discards still hide the base and the lower layers.
			c, err := st.Open("vol", cow.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, 8<<20)
			if _, err := c.ReadAt(buf, region); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, make([]byte, len(buf))) {
				t.Fatal("a discarded range reads non-zero after reopen")
			}
		})
	}
}
