package driver

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
)

// A volume's file system can be smaller than its device: a restore or a clone into a larger
// claim, or an expansion while the volume was not staged. Staging grows it before the pod
// sees it, so the pod always gets the size it asked for.

// growUnmountedExt grows an unmounted ext3/ext4 file system (format, per diskFormat) on dev
// to the device's size. Offline, resize2fs needs a freshly checked file system but no
// CAP_SYS_RESOURCE, which a mounted ext4 needs and some hosts do not grant even to root.
func growUnmountedExt(ex utilexec.Interface, dev, format string) error {
	if format != "ext3" && format != "ext4" {
		return nil
	}
	fsBytes, blockSize, err := extSize(ex, dev)
	if err != nil {
		return err
	}
	devBytes, err := deviceSize(dev)
	if err != nil {
		return fmt.Errorf("size of %s: %w", dev, err)
	}
	if devBytes-fsBytes < blockSize {
		return nil
	}
	klog.InfoS("Growing the file system before mounting it", "device", dev, "fsBytes", fsBytes, "deviceBytes", devBytes)
	// e2fsck -p: exit 1 means errors were corrected, which resize2fs accepts
	if out, err := ex.Command("e2fsck", "-f", "-p", dev).CombinedOutput(); err != nil {
		var ee utilexec.ExitError
		if !errors.As(err, &ee) || ee.ExitStatus() != 1 {
			return fmt.Errorf("e2fsck -f -p %s: %v: %s", dev, err, out)
		}
	}
	if out, err := ex.Command("resize2fs", dev).CombinedOutput(); err != nil {
		return fmt.Errorf("resize2fs %s: %v: %s", dev, err, out)
	}
	return nil
}

// growMounted grows a mounted xfs or btrfs (format, as found before mounting) to its
// device's size: those grow only mounted, need no special capability, and xfs_growfs and
// btrfs resize max do nothing to one that has it already. ext3/ext4 were grown before
// mounting.
func growMounted(ex utilexec.Interface, format, dev, path string) error {
	if format != "xfs" && format != "btrfs" {
		return nil
	}
	_, err := mount.NewResizeFs(ex).Resize(dev, path)
	return err
}

// diskFormat is the file system type blkid finds on dev, "" for none.
func diskFormat(ex utilexec.Interface, dev string) (string, error) {
	out, err := ex.Command("blkid", "-p", "-s", "TYPE", "-o", "value", dev).CombinedOutput()
	if err != nil {
		// exit status 2: nothing found
		var ee utilexec.ExitError
		if errors.As(err, &ee) && ee.ExitStatus() == 2 {
			return "", nil
		}
		return "", fmt.Errorf("blkid %s: %v: %s", dev, err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// extSize reads an ext file system's size and block size from its superblock.
func extSize(ex utilexec.Interface, dev string) (size, blockSize int64, err error) {
	out, err := ex.Command("dumpe2fs", "-h", dev).Output()
	if err != nil {
		return 0, 0, fmt.Errorf("dumpe2fs -h %s: %w", dev, err)
	}
	var count int64
	for _, line := range strings.Split(string(out), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, perr := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		switch strings.TrimSpace(k) {
		case "Block count":
			count, err = n, perr
		case "Block size":
			blockSize, err = n, perr
		}
		if err != nil {
			return 0, 0, fmt.Errorf("dumpe2fs -h %s: %s: %w", dev, line, err)
		}
	}
	if count == 0 || blockSize == 0 {
		return 0, 0, fmt.Errorf("dumpe2fs -h %s: no block count or block size", dev)
	}
	return count * blockSize, blockSize, nil
}
