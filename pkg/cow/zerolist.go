package cow

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"
)

// zeroListFile is the on-disk zero list of one layer: the ranges that read zero although a
// lower layer holds data there. Data written in the layer itself wins over an entry.
type zeroListFile struct {
	Format int        `json:"format"`
	Ranges [][2]int64 `json:"ranges"` // [offset, length], sorted, disjoint
}

func readZeroList(path string, size int64) ([]Extent, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read zero list: %w", err)
	}
	var z zeroListFile
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&z); err != nil {
		return nil, fmt.Errorf("%w: zero list %s: %v", ErrCorrupt, path, err)
	}
	if z.Format != formatVersion {
		return nil, fmt.Errorf("%w: zero list %s has format %d", ErrCorrupt, path, z.Format)
	}
	out := make([]Extent, 0, len(z.Ranges))
	var end int64
	for _, r := range z.Ranges {
		if r[0] < end || r[1] <= 0 || r[0]+r[1] > size || r[0]+r[1] < r[0] {
			return nil, fmt.Errorf("%w: zero list %s: range [%d, +%d) is unsorted, empty or past the layer's size %d", ErrCorrupt, path, r[0], r[1], size)
		}
		out = append(out, Extent{Off: r[0], Len: r[1]})
		end = r[0] + r[1]
	}
	return out, nil
}

// writeZeroList replaces the zero list at path atomically; an empty list removes the file.
func writeZeroList(path string, list []Extent) error {
	if len(list) == 0 {
		err := os.Remove(path)
		if err == nil || errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove zero list: %w", err)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Off < list[j].Off })
	z := zeroListFile{Format: formatVersion, Ranges: make([][2]int64, len(list))}
	for i, e := range list {
		z.Ranges[i] = [2]int64{e.Off, e.Len}
	}
	data, err := json.Marshal(z)
	if err != nil {
		return fmt.Errorf("encode zero list: %w", err)
	}
	return writeFileAtomic(path, append(data, '\n'))
}
