// Package images is a node's store of base images: plain raw files that volumes are built
// on. An image is imported once (a raw file copied sparsely, a qcow2 converted with
// qemu-img), never modified afterwards, and removed only when no chain uses it.
package images

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/rawcow/csi-rawcow/pkg/cow"
)

// Store is a directory of base images, DIR/NAME.raw.
type Store struct {
	dir string
}

// Open opens (creating if needed) the image directory dir.
func Open(dir string) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("images %s: %w", dir, err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return nil, fmt.Errorf("images %s: %w", dir, err)
	}
	return &Store{dir: abs}, nil
}

// Path returns the file of image name, after checking the name.
func (s *Store) Path(name string) (string, error) {
	if err := cow.ValidateName(name); err != nil {
		return "", err
	}
	return filepath.Join(s.dir, name+".raw"), nil
}

// Image describes an image of the store.
type Image struct {
	Name      string `json:"name"`
	Path      string `json:"path"`
	Size      int64  `json:"virtualSize"`
	Allocated int64  `json:"allocatedBytes"`
}

// Get describes image name, or fails with cow.ErrNotFound.
func (s *Store) Get(name string) (Image, error) {
	path, err := s.Path(name)
	if err != nil {
		return Image{}, err
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return Image{}, fmt.Errorf("image %s: %w", name, cow.ErrNotFound)
		}
		return Image{}, fmt.Errorf("image %s: %w", name, err)
	}
	return Image{Name: name, Path: path, Size: st.Size, Allocated: st.Blocks * 512}, nil
}

// List returns every image, sorted by name.
func (s *Store) List() ([]Image, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []Image
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".raw")
		if !ok || cow.ValidateName(name) != nil {
			continue
		}
		img, err := s.Get(name)
		if err != nil {
			continue // removed meanwhile
		}
		out = append(out, img)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Import copies the raw or qcow2 image src into the store as name. A raw source is copied
// sparsely (only its data extents, with copy_file_range); a qcow2 source is converted with
// qemu-img. progress, if set, is told the bytes done of the total. The image appears only
// once it is complete.
func (s *Store) Import(name, src string, progress func(done, total int64)) (Image, error) {
	dst, err := s.Path(name)
	if err != nil {
		return Image{}, err
	}
	if _, err := os.Stat(dst); err == nil {
		return Image{}, fmt.Errorf("image %s: %w", name, cow.ErrExists)
	}
	format, err := detectFormat(src)
	if err != nil {
		return Image{}, err
	}
	tmp := filepath.Join(s.dir, "."+name+".importing")
	os.Remove(tmp)
	switch format {
	case "raw":
		err = copySparse(tmp, src, progress)
	case "qcow2":
		err = convertQcow2(tmp, src)
	default:
		err = fmt.Errorf("%w: %s is a %s image; raw and qcow2 are supported", cow.ErrNotSupported, src, format)
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		os.Remove(tmp)
		return Image{}, fmt.Errorf("import %s: %w", name, err)
	}
	return s.Get(name)
}

// detectFormat tells qcow2 from raw by the magic number; everything else is raw.
func detectFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("import: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("import: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("import: %w: %s is not a regular file", cow.ErrNotSupported, path)
	}
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err == nil && string(magic[:]) == "QFI\xfb" {
		return "qcow2", nil
	}
	return "raw", nil
}

func convertQcow2(dst, src string) error {
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		return fmt.Errorf("%w: %s is qcow2 and qemu-img is not installed", cow.ErrNotSupported, src)
	}
	out, err := exec.Command(qemuImg, "convert", "-f", "qcow2", "-O", "raw", "-S", "4k", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img convert: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// copySparse copies the data extents of src to a new file dst of the same size.
func copySparse(dst, src string, progress func(done, total int64)) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(fi.Size()); err != nil {
		return err
	}
	extents, err := cow.DataExtents(in, fi.Size())
	if err != nil {
		return err
	}
	var total, done int64
	for _, e := range extents {
		total += e.Len
	}
	for _, e := range extents {
		if err := cow.CopyRange(out, in, e.Off, e.Len, func(n int64) {
			done += n
			if progress != nil {
				progress(done, total)
			}
		}); err != nil {
			return err
		}
	}
	return out.Sync()
}

// Remove deletes image name unless a chain of store st builds on it.
func (s *Store) Remove(name string, st *cow.Store) error {
	img, err := s.Get(name)
	if err != nil {
		return err
	}
	if err := st.RemoveBase(img.Path); err != nil {
		return fmt.Errorf("image %s: %w", name, err)
	}
	return nil
}
