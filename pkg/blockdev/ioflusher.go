package blockdev

import (
	"fmt"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// prctl options of Linux 5.6 that golang.org/x/sys does not name.
const (
	prSetIOFlusher = 57
	prGetIOFlusher = 58
)

// BecomeIOFlusher marks the process as an I/O flusher (PR_SET_IO_FLUSHER): its memory
// allocations never wait on I/O. A server whose loop devices back file systems needs this,
// or reclaim can wait for writeback that waits for the server. The flag is per thread and
// survives execve, so the process sets it on one thread and re-executes itself: every
// thread of the new image has it. Call it first thing in main; it returns nil when the
// flag is already set, and the kernel's refusal (no CAP_SYS_RESOURCE) otherwise.
func BecomeIOFlusher() error {
	if v, err := unix.PrctlRetInt(prGetIOFlusher, 0, 0, 0, 0); err == nil && v == 1 {
		return nil
	}
	runtime.LockOSThread()
	if err := unix.Prctl(prSetIOFlusher, 1, 0, 0, 0); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("PR_SET_IO_FLUSHER: %w", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("re-execute as an I/O flusher: %w", err)
	}
	return fmt.Errorf("re-execute as an I/O flusher: %w", syscall.Exec(exe, os.Args, os.Environ()))
}
