package fuseuring

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// The transport is exercised end to end by pkg/blockdev's tests (fio with verification,
// a killed server, live snapshots), which serve real loop devices over it.

// TestStartRefusedWithoutConnection: rings on a /dev/fuse descriptor that no mount ever
// initialized are refused by the kernel at registration: Start fails at once, nothing hangs,
// and its threads and rings are gone.
func TestStartRefusedWithoutConnection(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: /dev/fuse and the fuse module's enable_uring")
	}
	if err := Enable(); err != nil {
		t.Skipf("this kernel has no FUSE-over-io-uring: %v", err)
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	before := openFiles(t)
	rs, err := Start(fd, func(r *Request) { r.Reply(0, 0) }, Options{Depth: 4, PayloadSize: 1 << 20})
	if err == nil {
		rs.Close()
		t.Fatal("Start on an uninitialized connection succeeded")
	}
	t.Logf("refused as expected: %v", err)
	if after := openFiles(t); after != before {
		t.Errorf("%d descriptors open before Start, %d after its failure", before, after)
	}
}

func TestPossibleCPUs(t *testing.T) {
	n, err := possibleCPUs()
	if err != nil {
		t.Fatal(err)
	}
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	if n < set.Count() {
		t.Errorf("%d possible CPUs, fewer than the %d this process may run on", n, set.Count())
	}
}

func openFiles(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}
