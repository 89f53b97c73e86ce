package blockdev

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// LogicalBlockSize is the sector size of every loop device we configure: the engine's block,
// so a guest never writes less than a block and copy-up stays rare.
const LogicalBlockSize = 4096

// Loop describes an attached loop device.
type Loop struct {
	Device   string // /dev/loopN
	Backing  string // the backing file's path as the kernel reports it
	ReadOnly bool
	DirectIO bool
}

// A loop device's tag is the name it was configured with (lo_file_name, 63 bytes): csi-rawcow,
// a digest of the server's run directory and one of the attached name. Unlike the backing
// file's path, which the kernel reports relative to the mount that opened it (and only to
// its root once that mount is gone with its namespace: a restarted container), the tag reads
// the same from everywhere, so a server finds the devices of its predecessors by it, and a
// device number that the kernel has since given to another attachment is never taken for
// the old one.
const tagPrefix = "csi-rawcow "

func runTag(runDir string) string {
	sum := sha256.Sum256([]byte(runDir))
	return tagPrefix + hex.EncodeToString(sum[:8]) + " "
}

func loopTag(runDir, name string) string {
	sum := sha256.Sum256([]byte(name))
	return runTag(runDir) + hex.EncodeToString(sum[:16])
}

// loopStatus returns what a loop device serves; ok is false when it serves nothing (or the
// node is gone).
func loopStatus(dev string) (info *unix.LoopInfo64, ok bool, err error) {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("loop status %s: %w", dev, err)
	}
	defer f.Close()
	info, err = unix.IoctlLoopGetStatus64(int(f.Fd()))
	if errors.Is(err, unix.ENXIO) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("loop status %s: %w", dev, err)
	}
	return info, true, nil
}

func tagOf(info *unix.LoopInfo64) string {
	name := info.File_name[:]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return string(name)
}

// hasTag reports whether dev is attached with tag.
func hasTag(dev, tag string) bool {
	info, ok, err := loopStatus(dev)
	return err == nil && ok && tagOf(info) == tag
}

// taggedLoop is an attached loop device of a run directory's servers.
type taggedLoop struct {
	Loop
	tag        string
	dev, inode uint64 // the backing file's
}

// loopsOf lists the attached loop devices tagged by the servers of runDir.
func loopsOf(runDir string) ([]taggedLoop, error) {
	all, err := Loops("")
	if err != nil {
		return nil, err
	}
	prefix := runTag(runDir)
	var out []taggedLoop
	for _, l := range all {
		info, ok, err := loopStatus(l.Device)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue // detached meanwhile
		}
		if tag := tagOf(info); strings.HasPrefix(tag, prefix) {
			out = append(out, taggedLoop{Loop: l, tag: tag, dev: info.Device, inode: info.Inode})
		}
	}
	return out, nil
}

// LoopsOf lists the attached loop devices that the servers of runDir made, whatever mount
// namespace they ran in.
func LoopsOf(runDir string) ([]Loop, error) {
	abs, err := filepath.Abs(runDir)
	if err != nil {
		return nil, err
	}
	tagged, err := loopsOf(abs)
	out := make([]Loop, len(tagged))
	for i, l := range tagged {
		out[i] = l.Loop
	}
	return out, err
}

// AttachLoop configures a free loop device on the file at path with LOOP_CONFIGURE: direct
// I/O, 4096-byte logical blocks, read-only if asked, named tag (at most 63 bytes, see
// loopTag). It returns the device path.
func AttachLoop(path string, readOnly bool, tag string) (string, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	backing, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return "", fmt.Errorf("attach loop: %w", err)
	}
	defer backing.Close() // the loop device keeps its own reference
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("attach loop: %w", err)
	}
	defer ctl.Close()
	cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Size: LogicalBlockSize}
	cfg.Info.Flags = unix.LO_FLAGS_DIRECT_IO
	if readOnly {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], tag)
	// Another process may take the free device between GET_FREE and CONFIGURE: try again.
	for attempt := 0; attempt < 20; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("attach loop: LOOP_CTL_GET_FREE: %w", err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		f, err := openLoop(dev, flag)
		if err != nil {
			return "", fmt.Errorf("attach loop: %w", err)
		}
		err = unix.IoctlLoopConfigure(int(f.Fd()), &cfg)
		f.Close()
		if errors.Is(err, unix.EBUSY) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("attach loop %s: LOOP_CONFIGURE: %w", dev, err)
		}
		return dev, nil
	}
	return "", fmt.Errorf("attach loop: no free loop device after 20 attempts")
}

// openLoop opens a loop device node, waiting briefly for it to appear after LOOP_CTL_GET_FREE
// created it.
func openLoop(dev string, flag int) (*os.File, error) {
	for i := 0; ; i++ {
		f, err := os.OpenFile(dev, flag, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || i == 50 {
			return f, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// DetachLoop detaches a loop device. If it is still open (a mount, a process), the kernel
// detaches it when the last user closes it.
func DetachLoop(dev string) error { return detachTagged(dev, "") }

// detachTagged detaches dev if it is attached with tag (any tag when empty). A device that
// serves nothing now, or serves another attachment (the kernel reuses numbers), is left
// alone: what the tag named is detached already.
func detachTagged(dev, tag string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	defer f.Close() // held open, the device cannot change hands between the check and the clear
	if tag != "" {
		info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
		if errors.Is(err, unix.ENXIO) || err == nil && tagOf(info) != tag {
			return nil
		}
		if err != nil {
			return fmt.Errorf("detach %s: %w", dev, err)
		}
	}
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	return nil
}

// RefreshCapacity makes a loop device take up its backing file's new size.
func RefreshCapacity(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("set capacity %s: %w", dev, err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("set capacity %s: %w", dev, err)
	}
	return nil
}

// Loops lists the attached loop devices whose backing file lies under dir (all if dir is
// empty), from /sys/block/loopN/loop.
func Loops(dir string) ([]Loop, error) {
	matches, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return nil, err
	}
	var out []Loop
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err != nil {
			continue // detached meanwhile
		}
		backing := strings.TrimSuffix(string(b), "\n")
		backing = strings.TrimSuffix(backing, " (deleted)")
		if dir != "" && !strings.HasPrefix(backing, filepath.Clean(dir)+"/") {
			continue
		}
		sys := filepath.Dir(m)
		l := Loop{Device: "/dev/" + filepath.Base(filepath.Dir(sys)), Backing: backing}
		l.ReadOnly = readSysBool(filepath.Join(filepath.Dir(sys), "ro"))
		l.DirectIO = readSysBool(filepath.Join(sys, "dio"))
		out = append(out, l)
	}
	return out, nil
}

func readSysBool(path string) bool {
	b, err := os.ReadFile(path)
	return err == nil && strings.TrimSpace(string(b)) == "1"
}
