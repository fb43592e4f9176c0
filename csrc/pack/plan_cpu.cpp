// The pack planner. Single-threaded on purpose: the plan must not depend on the thread count,
// and 1M sequences take tens of milliseconds.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/rng.h"
#include "pack/pack.h"

#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace mixtape {
namespace {

inline int ctz64(uint64_t x) {
#if defined(_MSC_VER)
  unsigned long i;
  _BitScanForward64(&i, x);
  return static_cast<int>(i);
#else
  return __builtin_ctzll(x);
#endif
}

// A set of integers in [0, n) as a 64-ary tree of bitmasks: insert, erase and "smallest member
// >= x" in O(log64 n) (two levels for C = 4096). Best fit asks the last one once per piece.
class BitTree {
 public:
  explicit BitTree(int64_t n) {
    int64_t bits = std::max<int64_t>(n, 1);
    do {
      const int64_t words = (bits + 63) / 64;
      levels_.emplace_back(static_cast<size_t>(words), uint64_t{0});
      bits = words;
    } while (bits > 1);
  }

  void insert(int64_t i) {
    for (auto& level : levels_) {
      uint64_t& w = level[static_cast<size_t>(i >> 6)];
      const bool was_empty = w == 0;
      w |= uint64_t{1} << (i & 63);
      if (!was_empty) return;
      i >>= 6;
    }
  }

  void erase(int64_t i) {
    for (auto& level : levels_) {
      uint64_t& w = level[static_cast<size_t>(i >> 6)];
      w &= ~(uint64_t{1} << (i & 63));
      if (w != 0) return;
      i >>= 6;
    }
  }

  // Smallest member >= i, or -1.
  int64_t find_ge(int64_t i) const {
    const int top = static_cast<int>(levels_.size());
    int l = 0;
    for (; l < top; ++l) {
      const auto& level = levels_[static_cast<size_t>(l)];
      const int64_t word = i >> 6;
      if (word >= static_cast<int64_t>(level.size())) return -1;
      const uint64_t bits = level[static_cast<size_t>(word)] & (~uint64_t{0} << (i & 63));
      if (bits != 0) {
        i = (word << 6) | ctz64(bits);
        break;
      }
      i = word + 1;  // the next word of this level is the next bit one level up
    }
    if (l == top) return -1;
    while (l > 0) {
      --l;
      i = (i << 6) | ctz64(levels_[static_cast<size_t>(l)][static_cast<size_t>(i)]);
    }
    return i;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// Calls fn(doc, start, length) for every piece in input order, after the overflow policy.
template <typename T, typename Fn>
void for_each_piece(const T* lengths, int64_t n, const PackPlanOptions& o, Fn&& fn) {
  const int64_t C = o.capacity;
  for (int64_t i = 0; i < n; ++i) {
    int64_t len = static_cast<int64_t>(lengths[i]);
    if (len > C) {
      if (o.overflow == PackOverflow::kDrop) continue;
      if (o.overflow == PackOverflow::kTruncate) len = C;
    }
    for (int64_t s = 0; s < len; s += C) fn(i, s, std::min(C, len - s));
  }
}

// Adds a sequence's tokens to a running total, rejecting totals past int64 (a corrupt lengths
// file must give an error, not a wrapped, negative token count).
inline void add_tokens(int64_t* total, int64_t len, int64_t i) {
  if (len > std::numeric_limits<int64_t>::max() - *total) {
    throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(len) +
                                ": the total number of tokens exceeds 2^63 - 1");
  }
  *total += len;
}

// Validates the lengths, applies the overflow policy to the counters and returns the number of
// pieces.
template <typename T>
int64_t count_pieces(const T* lengths, int64_t n, const PackPlanOptions& o,
                     PackPlanResult* out) {
  const int64_t C = o.capacity;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = static_cast<int64_t>(lengths[i]);
    if (len < 1) {
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(len) +
                                  ": every sequence needs at least one token");
    }
    add_tokens(&out->num_tokens, len, i);
    if (len <= C) {
      ++count;
      continue;
    }
    switch (o.overflow) {
      case PackOverflow::kSplit:
        count += (len - 1) / C + 1;  // ceil(len / C) without forming len + C - 1
        ++out->split_docs;
        break;
      case PackOverflow::kTruncate:
        ++count;
        out->truncated_tokens += len - C;
        break;
      case PackOverflow::kDrop:
        ++out->dropped_docs;
        out->dropped_tokens += len;
        break;
      case PackOverflow::kError:
        throw std::invalid_argument("sequence " + std::to_string(i) + " has " +
                                    std::to_string(len) + " tokens, more than the capacity " +
                                    std::to_string(C) +
                                    " (overflow='error'; use 'split', 'truncate' or 'drop')");
    }
  }
  return count;
}

// Pieces sorted by length, longest first, ties in input order: a stable counting sort (O(n + C)),
// lengths written as runs so the fit loop reads them sequentially.
struct SortedPieces {
  std::vector<int64_t> doc, start, length;
};

// Few pieces against a large C (the loader plans ~100 per batch of 4096-token rows): the
// C-sized tables of the counting sort and of best fit cost more than the work, and evict the
// caller's data from cache. Below this many pieces both use O(n) memory instead, with the same
// result.
inline bool few_pieces(int64_t count, int64_t capacity) {
  return count <= std::min<int64_t>(256, capacity / 4);
}

template <typename T>
SortedPieces sort_pieces(const T* lengths, int64_t n, const PackPlanOptions& o,
                         PackPlanResult* out) {
  const int64_t C = o.capacity;
  const int64_t count = count_pieces(lengths, n, o, out);
  SortedPieces sp;
  sp.doc.resize(static_cast<size_t>(count));
  sp.start.resize(static_cast<size_t>(count));
  sp.length.resize(static_cast<size_t>(count));
  if (few_pieces(count, C)) {  // a stable comparison sort: the same order
    struct Piece {
      int64_t doc, start, length;
    };
    std::vector<Piece> pieces;
    pieces.reserve(static_cast<size_t>(count));
    for_each_piece(lengths, n, o, [&](int64_t doc, int64_t start, int64_t len) {
      pieces.push_back(Piece{doc, start, len});
    });
    std::stable_sort(pieces.begin(), pieces.end(),
                     [](const Piece& a, const Piece& b) { return a.length > b.length; });
    for (size_t k = 0; k < pieces.size(); ++k) {
      sp.doc[k] = pieces[k].doc;
      sp.start[k] = pieces[k].start;
      sp.length[k] = pieces[k].length;
    }
    return sp;
  }
  std::vector<int64_t> pos(static_cast<size_t>(C) + 1, 0);
  for_each_piece(lengths, n, o, [&](int64_t, int64_t, int64_t len) {
    ++pos[static_cast<size_t>(len)];
  });
  int64_t at = 0;
  for (int64_t len = C; len >= 1; --len) {  // counts -> first slot of each length
    int64_t& p = pos[static_cast<size_t>(len)];
    if (p == 0) continue;
    const int64_t c = p;
    std::fill(sp.length.begin() + at, sp.length.begin() + at + c, len);
    p = at;
    at += c;
  }
  for_each_piece(lengths, n, o, [&](int64_t doc, int64_t start, int64_t len) {
    const size_t k = static_cast<size_t>(pos[static_cast<size_t>(len)]++);
    sp.doc[k] = doc;
    sp.start[k] = start;
  });
  return sp;
}

// Placement of the piece processed k-th: its row and column.
struct Placement {
  std::vector<int64_t> row, column;
  int64_t rows = 0;
};

inline int64_t units(int64_t len, int64_t align) { return (len + align - 1) / align; }

// Best fit: bins bucketed by remaining capacity (in align units), a LIFO list per bucket and a
// BitTree of the non-empty buckets; a bin leaves the structure when full or at max docs.
Placement best_fit(const std::vector<int64_t>& length, const PackPlanOptions& o) {
  const int64_t align = o.align, cap = o.capacity / align, max_docs = o.max_docs_per_row;
  const size_t n = length.size();
  Placement pl;
  pl.row.resize(n);
  pl.column.resize(n);
  struct Bin {
    int64_t left;  // remaining capacity, align units
    int64_t docs;  // pieces placed
    int64_t next;  // next bin in the same bucket, or -1
  };
  std::vector<Bin> bins;
  bins.reserve(n);
  // Puts the k-th piece (s units) into bin b; true while the bin takes more pieces.
  const auto place = [&](size_t k, int64_t b, int64_t s) {
    Bin& bin = bins[static_cast<size_t>(b)];
    pl.row[k] = b;
    pl.column[k] = (cap - bin.left) * align;
    bin.left -= s;
    ++bin.docs;
    return bin.left > 0 && (max_docs == 0 || bin.docs < max_docs);
  };
  if (few_pieces(static_cast<int64_t>(n), o.capacity)) {
    // The open bins sorted by (remaining capacity, most recently (re)inserted first): the first
    // with room is what the buckets' BitTree and LIFO lists give.
    struct Open {
      int64_t left, stamp, bin;
    };
    std::vector<Open> open;
    open.reserve(n);
    const auto before = [](const Open& a, const Open& b) {
      return a.left < b.left || (a.left == b.left && a.stamp > b.stamp);
    };
    for (size_t k = 0; k < n; ++k) {
      const int64_t s = units(length[k], align);
      const auto it = std::lower_bound(open.begin(), open.end(), s,
                                       [](const Open& e, int64_t x) { return e.left < x; });
      int64_t b;
      if (it == open.end()) {
        b = static_cast<int64_t>(bins.size());
        bins.push_back(Bin{cap, 0, -1});
      } else {
        b = it->bin;
        open.erase(it);
      }
      if (place(k, b, s)) {
        const Open e{bins[static_cast<size_t>(b)].left, static_cast<int64_t>(k), b};
        open.insert(std::upper_bound(open.begin(), open.end(), e, before), e);
      }
    }
    pl.rows = static_cast<int64_t>(bins.size());
    return pl;
  }
  std::vector<int64_t> head(static_cast<size_t>(cap) + 1, -1);
  BitTree nonempty(cap + 1);
  for (size_t k = 0; k < n; ++k) {
    const int64_t s = units(length[k], align);
    const int64_t r = nonempty.find_ge(s);
    int64_t b;
    if (r < 0) {
      b = static_cast<int64_t>(bins.size());
      bins.push_back(Bin{cap, 0, -1});
    } else {
      b = head[static_cast<size_t>(r)];
      head[static_cast<size_t>(r)] = bins[static_cast<size_t>(b)].next;
      if (head[static_cast<size_t>(r)] < 0) nonempty.erase(r);
    }
    if (place(k, b, s)) {
      Bin& bin = bins[static_cast<size_t>(b)];
      int64_t& h = head[static_cast<size_t>(bin.left)];
      bin.next = h;
      if (h < 0) nonempty.insert(bin.left);
      h = b;
    }
  }
  pl.rows = static_cast<int64_t>(bins.size());
  return pl;
}

// First fit: a max segment tree over bins (leaves not yet opened hold the full capacity, so the
// leftmost fit opens bins in order); a bin at max docs gets remaining 0.
Placement first_fit(const std::vector<int64_t>& length, const PackPlanOptions& o) {
  const int64_t align = o.align, max_docs = o.max_docs_per_row;
  const int32_t cap = static_cast<int32_t>(o.capacity / align);
  const size_t n = length.size();
  Placement pl;
  pl.row.resize(n);
  pl.column.resize(n);
  size_t leaves = 1;
  while (leaves < n) leaves <<= 1;
  std::vector<int32_t> tree(2 * leaves, cap);
  std::vector<int64_t> cnt(leaves, 0);
  for (size_t k = 0; k < n; ++k) {
    const int32_t s = static_cast<int32_t>(units(length[k], align));
    size_t node = 1;
    while (node < leaves) node = tree[2 * node] >= s ? 2 * node : 2 * node + 1;
    const size_t b = node - leaves;
    pl.row[k] = static_cast<int64_t>(b);
    pl.column[k] = static_cast<int64_t>(cap - tree[node]) * align;
    pl.rows = std::max(pl.rows, static_cast<int64_t>(b) + 1);
    const int64_t c = ++cnt[b];
    tree[node] = (max_docs != 0 && c >= max_docs) ? 0 : tree[node] - s;
    for (node >>= 1; node >= 1; node >>= 1) {
      const int32_t v = std::max(tree[2 * node], tree[2 * node + 1]);
      if (tree[node] == v) break;
      tree[node] = v;
    }
  }
  return pl;
}

// Sorted pieces placed by `pl` -> CSR over rows, pieces of a row in placement order.
void to_rows(const SortedPieces& sp, const Placement& pl, PackPlanResult* out) {
  const size_t n = pl.row.size();
  out->row_offsets.assign(static_cast<size_t>(pl.rows) + 1, 0);
  for (size_t k = 0; k < n; ++k) ++out->row_offsets[static_cast<size_t>(pl.row[k]) + 1];
  for (size_t r = 1; r < out->row_offsets.size(); ++r) {
    out->row_offsets[r] += out->row_offsets[r - 1];
  }
  std::vector<int64_t> fill(out->row_offsets.begin(), out->row_offsets.end() - 1);
  out->doc.resize(n);
  out->start.resize(n);
  out->length.resize(n);
  out->column.resize(n);
  for (size_t k = 0; k < n; ++k) {
    const size_t p = static_cast<size_t>(fill[static_cast<size_t>(pl.row[k])]++);
    out->doc[p] = sp.doc[k];
    out->start[p] = sp.start[k];
    out->length[p] = sp.length[k];
    out->column[p] = pl.column[k];
  }
}

// Next fit: input order, one open row; a new row when the piece does not fit or at max docs.
// Rows fill in order, so the CSR is written directly.
template <typename T>
void next_fit(const T* lengths, int64_t n, const PackPlanOptions& o, PackPlanResult* out) {
  const int64_t align = o.align, cap = o.capacity / align, max_docs = o.max_docs_per_row;
  const size_t count = static_cast<size_t>(count_pieces(lengths, n, o, out));
  out->doc.resize(count);
  out->start.resize(count);
  out->length.resize(count);
  out->column.resize(count);
  out->row_offsets.reserve(count + 1);
  int64_t used = 0, docs = 0;
  size_t k = 0;
  for_each_piece(lengths, n, o, [&](int64_t doc, int64_t start, int64_t len) {
    const int64_t s = units(len, align);
    if (k == 0 || used + s > cap || (max_docs != 0 && docs >= max_docs)) {
      out->row_offsets.push_back(static_cast<int64_t>(k));
      used = 0;
      docs = 0;
    }
    out->doc[k] = doc;
    out->start[k] = start;
    out->length[k] = len;
    out->column[k] = used * align;
    used += s;
    ++docs;
    ++k;
  });
  out->row_offsets.push_back(static_cast<int64_t>(k));
}

// Wrapped: the concatenation in input order, cut at row ends (and at max docs); every sequence is
// placed whatever its length.
template <typename T>
void wrapped(const T* lengths, int64_t n, const PackPlanOptions& o, PackPlanResult* out) {
  const int64_t align = o.align, cap = o.capacity / align, max_docs = o.max_docs_per_row;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = static_cast<int64_t>(lengths[i]);
    if (len < 1) {
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(len) +
                                  ": every sequence needs at least one token");
    }
    add_tokens(&total, len, i);
  }
  out->num_tokens = total;
  const size_t guess = static_cast<size_t>(n + total / o.capacity + 1);
  out->doc.reserve(guess);
  out->start.reserve(guess);
  out->length.reserve(guess);
  out->column.reserve(guess);
  out->row_offsets.reserve(static_cast<size_t>(total / o.capacity + 2));
  int64_t used = 0, cnt = 0;
  bool open = false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = static_cast<int64_t>(lengths[i]);
    int64_t pieces = 0;
    for (int64_t s = 0; s < len;) {
      if (!open || used == cap || (max_docs != 0 && cnt >= max_docs)) {
        out->row_offsets.push_back(static_cast<int64_t>(out->doc.size()));
        open = true;
        used = 0;
        cnt = 0;
      }
      const int64_t take = std::min(len - s, (cap - used) * align);
      out->doc.push_back(i);
      out->start.push_back(s);
      out->length.push_back(take);
      out->column.push_back(used * align);
      used += units(take, align);
      ++cnt;
      ++pieces;
      s += take;
    }
    if (pieces > 1) ++out->split_docs;
  }
  out->row_offsets.push_back(static_cast<int64_t>(out->doc.size()));
}

// Rows permuted by a seeded Fisher-Yates: new row k is old row perm[k].
void shuffle_rows(uint64_t seed, PackPlanResult* out) {
  const int64_t rows = static_cast<int64_t>(out->row_offsets.size()) - 1;
  if (rows < 2) return;
  std::vector<int64_t> perm(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) perm[static_cast<size_t>(r)] = r;
  SplitMix64 rng{seed};
  for (int64_t i = rows - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(j)]);
  }
  PackPlanResult shuffled;
  const size_t pieces = out->doc.size();
  shuffled.row_offsets.resize(static_cast<size_t>(rows) + 1);
  shuffled.doc.resize(pieces);
  shuffled.start.resize(pieces);
  shuffled.length.resize(pieces);
  shuffled.column.resize(pieces);
  int64_t p = 0;
  for (int64_t r = 0; r < rows; ++r) {
    shuffled.row_offsets[static_cast<size_t>(r)] = p;
    const int64_t src = perm[static_cast<size_t>(r)];
    for (int64_t q = out->row_offsets[static_cast<size_t>(src)];
         q < out->row_offsets[static_cast<size_t>(src) + 1]; ++q, ++p) {
      shuffled.doc[static_cast<size_t>(p)] = out->doc[static_cast<size_t>(q)];
      shuffled.start[static_cast<size_t>(p)] = out->start[static_cast<size_t>(q)];
      shuffled.length[static_cast<size_t>(p)] = out->length[static_cast<size_t>(q)];
      shuffled.column[static_cast<size_t>(p)] = out->column[static_cast<size_t>(q)];
    }
  }
  shuffled.row_offsets[static_cast<size_t>(rows)] = p;
  out->row_offsets.swap(shuffled.row_offsets);
  out->doc.swap(shuffled.doc);
  out->start.swap(shuffled.start);
  out->length.swap(shuffled.length);
  out->column.swap(shuffled.column);
}

void check_options(const PackPlanOptions& o) {
  if (o.capacity < 1 || o.capacity > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("capacity must be in [1, 2^31 - 1], got " +
                                std::to_string(o.capacity));
  }
  if (o.align < 1 || o.capacity % o.align != 0) {
    throw std::invalid_argument("align must be >= 1 and divide the capacity " +
                                std::to_string(o.capacity) + ", got " + std::to_string(o.align));
  }
  if (o.max_docs_per_row < 0) {
    throw std::invalid_argument("max_docs_per_row must be >= 1 (0: no limit), got " +
                                std::to_string(o.max_docs_per_row));
  }
  if (o.rows_multiple_of < 1) {
    throw std::invalid_argument("rows_multiple_of must be >= 1, got " +
                                std::to_string(o.rows_multiple_of));
  }
}

}  // namespace

PackStrategy parse_pack_strategy(const std::string& name) {
  if (name == "bfd") return PackStrategy::kBfd;
  if (name == "ffd") return PackStrategy::kFfd;
  if (name == "next_fit") return PackStrategy::kNextFit;
  if (name == "wrapped") return PackStrategy::kWrapped;
  throw std::invalid_argument("unknown packing strategy '" + name +
                              "'; expected one of 'bfd', 'ffd', 'next_fit', 'wrapped'");
}

PackOverflow parse_pack_overflow(const std::string& name) {
  if (name == "split") return PackOverflow::kSplit;
  if (name == "truncate") return PackOverflow::kTruncate;
  if (name == "drop") return PackOverflow::kDrop;
  if (name == "error") return PackOverflow::kError;
  throw std::invalid_argument("unknown overflow policy '" + name +
                              "'; expected one of 'split', 'truncate', 'drop', 'error'");
}

template <typename T>
void pack_plan_cpu(const T* lengths, int64_t n, const PackPlanOptions& o, PackPlanResult* out) {
  check_options(o);
  *out = PackPlanResult{};
  if (o.strategy == PackStrategy::kWrapped) {
    wrapped(lengths, n, o, out);
  } else if (o.strategy == PackStrategy::kNextFit) {
    next_fit(lengths, n, o, out);
  } else {
    const SortedPieces sp = sort_pieces(lengths, n, o, out);
    const Placement pl = o.strategy == PackStrategy::kBfd ? best_fit(sp.length, o)
                                                          : first_fit(sp.length, o);
    to_rows(sp, pl, out);
  }
  if (o.shuffle) shuffle_rows(o.shuffle_seed, out);
  const int64_t rows = static_cast<int64_t>(out->row_offsets.size()) - 1;
  const int64_t m = o.rows_multiple_of;  // rounded up without forming rows + m - 1
  const int64_t padded = rows % m == 0 ? rows : rows + (m - rows % m);
  out->row_offsets.resize(static_cast<size_t>(padded) + 1, out->row_offsets.back());
}

template void pack_plan_cpu<int32_t>(const int32_t*, int64_t, const PackPlanOptions&,
                                     PackPlanResult*);
template void pack_plan_cpu<int64_t>(const int64_t*, int64_t, const PackPlanOptions&,
                                     PackPlanResult*);

}  // namespace mixtape
