package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/rawcow/csi-rawcow/pkg/cow"
	"github.com/rawcow/csi-rawcow/pkg/images"
)

// defaultRootDir is a node's root directory: ROOT/store holds the volumes and snapshots,
// ROOT/images the base images they build on.
const defaultRootDir = "/var/lib/csi-rawcow"

// kindImage is the kind list gives a base image, beside "volume" and "snapshot".
const kindImage = "image"

// rootDirDefault is the root directory without --root: $CSI_RAWCOW_ROOT, else /var/lib/csi-rawcow.
func rootDirDefault() string {
	if d := os.Getenv("CSI_RAWCOW_ROOT"); d != "" {
		return d
	}
	return defaultRootDir
}

// imagesExist reports whether the image directory has been made; only import makes it.
func (t *imageTool) imagesExist() bool {
	fi, err := os.Stat(t.imagesDir())
	return err == nil && fi.IsDir()
}

// openImages opens the image store. Only import may create its directory.
func (t *imageTool) openImages(create bool) (*images.Store, error) {
	if !create && !t.imagesExist() {
		return nil, fmt.Errorf("no base images in %s (set --root or $CSI_RAWCOW_ROOT; import adds images)", t.imagesDir())
	}
	return images.Open(t.imagesDir())
}

// getImage describes base image name, saying where it was looked for when it is missing.
func (t *imageTool) getImage(name string) (images.Image, error) {
	if err := validateNames(name); err != nil {
		return images.Image{}, err
	}
	imgs, err := t.openImages(false)
	if err != nil {
		return images.Image{}, err
	}
	img, err := imgs.Get(name)
	if errors.Is(err, cow.ErrNotFound) {
		return img, fmt.Errorf("%w in %s (csi-rawcow image import %s FILE)", err, t.imagesDir(), name)
	}
	return img, err
}

func imageImport(t *imageTool, fs *flag.FlagSet, args []string) error {
	pos, err := parsePositional(fs, args, 2, 2)
	if err != nil {
		return err
	}
	name, src := pos[0], pos[1]
	if err := validateNames(name); err != nil {
		return err
	}
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("import %s: %w", name, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("import %s: %s is not a regular file", name, src)
	}
	format, err := imageFormat(src)
	if err != nil {
		return fmt.Errorf("import %s: %w", name, err)
	}
	imgs, err := t.openImages(true)
	if err != nil {
		return err
	}
	bar := newProgress(t.progress, "import "+name)
	start := time.Now()
	img, err := imgs.Import(name, src, bar.Update)
	if err != nil {
		bar.Abort()
		return err
	}
	bar.Finish()
	fmt.Fprintf(t.stdout, "imported %s image %s as %s (%s): virtual size %s, %s allocated, in %s\n",
		format, src, name, img.Path, sizeWithBytes(img.Size), humanSize(img.Allocated), time.Since(start).Round(time.Millisecond))
	return nil
}

// imageFormat names the format of the image file at path for messages: qcow2 by its magic
// number, raw otherwise (images.Import decides the same way).
func imageFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err == nil && string(magic[:]) == "QFI\xfb" {
		return "qcow2", nil
	}
	return "raw", nil
}

func imageRemove(t *imageTool, fs *flag.FlagSet, args []string) error {
	pos, err := parsePositional(fs, args, 1, 1)
	if err != nil {
		return err
	}
	name := pos[0]
	img, err := t.getImage(name)
	if err != nil {
		return err
	}
	if !t.storeExists() {
		// No store, no chain: nothing can build on the image.
		if err := os.Remove(img.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("image %s: %w", name, err)
		}
	} else {
		st, err := t.openStore(false)
		if err != nil {
			return err
		}
		imgs, err := t.openImages(false)
		if err != nil {
			return err
		}
		if err := imgs.Remove(name, st); err != nil {
			if errors.Is(err, cow.ErrBusy) {
				return fmt.Errorf("%w; delete them first, or keep the image", err)
			}
			return err
		}
	}
	fmt.Fprintf(t.stdout, "removed image %s (%s), freed %s\n", name, img.Path, humanSize(img.Allocated))
	return nil
}

// describeImages returns the base images as list rows, with the chains of st (if any) that
// build on each. No image directory means no images.
func (t *imageTool) describeImages(st *cow.Store) ([]listEntry, error) {
	out := []listEntry{}
	if !t.imagesExist() {
		return out, nil
	}
	imgs, err := t.openImages(false)
	if err != nil {
		return nil, err
	}
	list, err := imgs.List()
	if err != nil {
		return nil, err
	}
	for _, img := range list {
		e := listEntry{Path: img.Path, Info: &cow.Info{
			Name: img.Name, Kind: kindImage, Size: img.Size, Allocated: img.Allocated,
			Layers: []cow.LayerInfo{{State: cow.Base, Size: img.Size, Path: img.Path, Allocated: img.Allocated}},
		}}
		if fi, err := os.Stat(img.Path); err == nil {
			e.Created = fi.ModTime().UTC()
		}
		if st != nil {
			if e.Users, err = st.BaseUsers(img.Path); err != nil {
				return nil, err
			}
		}
		out = append(out, e)
	}
	return out, nil
}
