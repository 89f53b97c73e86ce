package cow

import "github.com/google/btree"

// span is one entry of a rangeMap: the half-open byte range [start, end) carries val.
type span[V comparable] struct {
	start, end int64
	val        V
}

// rangeMap is an ordered map from disjoint byte ranges to values, kept coalesced
// (no two touching spans carry equal values). Offsets outside every span are gaps.
// Memory grows with the number of spans, never with the size of the address space,
// and every lookup is O(log spans). It is not safe for concurrent use: the caller locks.
type rangeMap[V comparable] struct {
	tree    *btree.BTreeG[span[V]]
	scratch []span[V] // reused by update; the caller's lock covers it
}

func newRangeMap[V comparable]() *rangeMap[V] {
	return &rangeMap[V]{tree: btree.NewG(32, func(a, b span[V]) bool { return a.start < b.start })}
}

// len returns the number of spans.
func (m *rangeMap[V]) len() int { return m.tree.Len() }

// lookup returns the span that contains off, or the gap around it (ok false)
// clipped to [off, limit). The returned range always starts at off.
func (m *rangeMap[V]) lookup(off, limit int64) (end int64, val V, ok bool) {
	var found span[V]
	var have bool
	m.tree.DescendLessOrEqual(span[V]{start: off}, func(s span[V]) bool {
		found, have = s, true
		return false
	})
	if have && found.end > off {
		return min(found.end, limit), found.val, true
	}
	end = limit
	m.tree.AscendGreaterOrEqual(span[V]{start: off + 1}, func(s span[V]) bool {
		end = min(s.start, limit)
		return false
	})
	return end, val, false
}

// each calls fn for every span and gap in [start, end), in order, clipped to the range.
// Gaps are reported with ok false. It stops early when fn returns false.
func (m *rangeMap[V]) each(start, end int64, fn func(s, e int64, val V, ok bool) bool) {
	pos := start
	var zero V
	visit := func(s span[V]) bool {
		if s.end <= pos {
			return true
		}
		if s.start >= end {
			return false
		}
		if s.start > pos {
			if !fn(pos, s.start, zero, false) {
				pos = end
				return false
			}
			pos = s.start
		}
		e := min(s.end, end)
		if !fn(pos, e, s.val, true) {
			pos = end
			return false
		}
		pos = e
		return pos < end
	}
	// The span containing start, if any, begins before start.
	m.tree.DescendLessOrEqual(span[V]{start: start}, func(s span[V]) bool {
		if s.start < start {
			visit(s)
		}
		return false
	})
	if pos < end {
		m.tree.AscendRange(span[V]{start: pos}, span[V]{start: end}, visit)
	}
	if pos < end {
		fn(pos, end, zero, false)
	}
}

// update replaces the values over [start, end): f receives each span's value (or a
// gap, ok false) and returns the new one, or keep false to leave a gap there.
// Spans are split at start and end and coalesced with equal neighbours afterwards.
func (m *rangeMap[V]) update(start, end int64, f func(val V, ok bool) (V, bool)) {
	if start >= end {
		return
	}
	old := m.scratch[:0]
	m.tree.DescendLessOrEqual(span[V]{start: start}, func(s span[V]) bool {
		if s.start < start && s.end > start {
			old = append(old, s)
		}
		return false
	})
	m.tree.AscendRange(span[V]{start: start}, span[V]{start: end}, func(s span[V]) bool {
		old = append(old, s)
		return true
	})
	for _, s := range old {
		m.tree.Delete(s)
	}
	// The parts of the first and last spans outside [start, end) keep their values.
	if len(old) > 0 && old[0].start < start {
		m.insert(span[V]{start: old[0].start, end: start, val: old[0].val})
	}
	pos := start
	for _, s := range old {
		if s.start > pos {
			if v, keep := f(*new(V), false); keep {
				m.insert(span[V]{start: pos, end: s.start, val: v})
			}
			pos = s.start
		}
		e := min(s.end, end)
		if v, keep := f(s.val, true); keep {
			m.insert(span[V]{start: max(s.start, start), end: e, val: v})
		}
		pos = e
	}
	if pos < end {
		if v, keep := f(*new(V), false); keep {
			m.insert(span[V]{start: pos, end: end, val: v})
		}
	}
	if n := len(old); n > 0 && old[n-1].end > end {
		m.insert(span[V]{start: end, end: old[n-1].end, val: old[n-1].val})
	}
	clear(old)
	m.scratch = old[:0]
}

// set gives [start, end) the value val.
func (m *rangeMap[V]) set(start, end int64, val V) {
	m.update(start, end, func(V, bool) (V, bool) { return val, true })
}

// insert adds s, which must not overlap any span, merging it with touching equal neighbours.
func (m *rangeMap[V]) insert(s span[V]) {
	m.tree.DescendLessOrEqual(span[V]{start: s.start}, func(prev span[V]) bool {
		if prev.end == s.start && prev.val == s.val {
			m.tree.Delete(prev)
			s.start = prev.start
		}
		return false
	})
	if next, ok := m.tree.Get(span[V]{start: s.end}); ok && next.val == s.val {
		m.tree.Delete(next)
		s.end = next.end
	}
	m.tree.ReplaceOrInsert(s)
}
