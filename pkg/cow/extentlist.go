package cow

import "sort"

// normalize sorts extents and merges the ones that overlap or touch.
func normalize(list []Extent) []Extent {
	sort.Slice(list, func(i, j int) bool { return list[i].Off < list[j].Off })
	out := list[:0]
	for _, e := range list {
		if e.Len <= 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1].End() >= e.Off {
			out[n-1].Len = max(out[n-1].End(), e.End()) - out[n-1].Off
			continue
		}
		out = append(out, e)
	}
	return out
}

// union returns the ranges in a or in b.
func union(a, b []Extent) []Extent {
	return normalize(append(append([]Extent(nil), a...), b...))
}

// subtract returns the ranges of a that are not in b. Both must be normalized.
func subtract(a, b []Extent) []Extent {
	var out []Extent
	j := 0
	for _, e := range a {
		start, end := e.Off, e.End()
		for j < len(b) && b[j].End() <= start {
			j++
		}
		for k := j; k < len(b) && b[k].Off < end; k++ {
			if b[k].Off > start {
				out = append(out, Extent{Off: start, Len: b[k].Off - start})
			}
			start = max(start, b[k].End())
		}
		if start < end {
			out = append(out, Extent{Off: start, Len: end - start})
		}
	}
	return out
}

// clip returns the parts of list inside [0, size).
func clip(list []Extent, size int64) []Extent {
	var out []Extent
	for _, e := range list {
		if e.Off >= size {
			break
		}
		if e.End() > size {
			e.Len = size - e.Off
		}
		out = append(out, e)
	}
	return out
}
