//! The lanes of the float32 accumulation: blocks as vectors of L values,
//! each lane's range, scale and levels, and the drivers that cut a batch
//! into blocks ([`lanes_build`], compiled once per build around that
//! build's level kernel).

use super::wide::{ChannelWide, Spill};
use super::{
    levels_for, ExactError, FIRST_LEVEL_BITS, LEVEL_BITS, MAX_LEVEL_SPAN, X2_LOWEST, X2_UNIT,
    X_LOWEST, X_UNIT,
};

/// The vectors of one block: `count` of them, vector i the first L values
/// of `values[i * stride..]` (stride >= L), then `tail` if any; `ahead`
/// the values to be read next, which the kernels ask the CPU to fetch into
/// its cache meanwhile (a 64-byte line per vector).
pub(super) struct Vectors<'a, const L: usize> {
    pub(super) values: &'a [f32],
    pub(super) stride: usize,
    pub(super) count: usize,
    pub(super) tail: Option<[f32; L]>,
    pub(super) ahead: &'a [f32],
}

impl<const L: usize> Vectors<'_, L> {
    #[inline(always)]
    pub(super) fn iter(&self) -> impl Iterator<Item = &[f32; L]> {
        self.values
            .chunks(self.stride)
            .take(self.count)
            .filter_map(|row| row.first_chunk::<L>())
            .chain(self.tail.as_ref())
    }
}

/// What a block's lanes are: whether each is this group's (false: another
/// group's column, read again here), its range (see [`lane_ranges`]) and
/// its channel.
pub(super) struct Group<const L: usize> {
    pub(super) mine: [bool; L],
    pub(super) high: [u32; L],
    pub(super) low: [u32; L],
    pub(super) channel: [usize; L],
}

/// Per lane: the largest magnitude's bits, and the smallest nonzero one's
/// minus one (zero wraps to the largest u32, so it never is the minimum).
#[inline(always)]
pub(super) fn lane_ranges<const L: usize>(vectors: &Vectors<L>) -> ([u32; L], [u32; L]) {
    let mut high = [0u32; L];
    let mut low = [u32::MAX; L];
    let mut add = |vector: &[f32; L]| {
        for ((high, low), x) in high.iter_mut().zip(low.iter_mut()).zip(vector) {
            let magnitude = x.to_bits() & 0x7fff_ffff;
            *high = (*high).max(magnitude);
            *low = (*low).min(magnitude.wrapping_sub(1));
        }
    };
    if vectors.stride == L {
        // Contiguous vectors (the channel runs): a plain loop over the
        // slice, which compiles to a few vector instructions per vector
        // (the general iterator below costs several times that).
        let values = &vectors.values[..(vectors.count * L).min(vectors.values.len())];
        for vector in values
            .chunks_exact(L)
            .filter_map(|chunk| chunk.first_chunk::<L>())
        {
            add(vector);
        }
        if let Some(tail) = &vectors.tail {
            add(tail);
        }
    } else {
        for vector in vectors.iter() {
            add(vector);
        }
    }
    (high, low)
}

/// The ranges (as [`lane_ranges`]) of `columns` over the first `rows` rows
/// of `width` values of `block`, into `high` and `low` (one per column).
#[inline(always)]
pub(super) fn column_ranges(
    block: &[f32],
    width: usize,
    rows: usize,
    columns: std::ops::Range<usize>,
    high: &mut [u32],
    low: &mut [u32],
) {
    high.fill(0);
    low.fill(u32::MAX);
    for row in block.chunks(width).take(rows) {
        for ((high, low), x) in high
            .iter_mut()
            .zip(low.iter_mut())
            .zip(&row[columns.clone()])
        {
            let magnitude = x.to_bits() & 0x7fff_ffff;
            *high = (*high).max(magnitude);
            *low = (*low).min(magnitude.wrapping_sub(1));
        }
    }
}

/// The group of a table's L columns from `start`, those before `next` not
/// its own (read again by a last, overlapping group); `high` and `low` are
/// the ranges of the panel's columns from `panel_start`.
#[inline(always)]
pub(super) fn table_group<const L: usize>(
    start: usize,
    next: usize,
    panel_start: usize,
    high: &[u32],
    low: &[u32],
    channel_of: &impl Fn(usize) -> usize,
) -> Group<L> {
    let mine: [bool; L] = std::array::from_fn(|k| start + k >= next);
    let range = |ranges: &[u32], k: usize, none: u32| {
        if mine[k] {
            ranges[start + k - panel_start]
        } else {
            none
        }
    };
    Group {
        mine,
        high: std::array::from_fn(|k| range(high, k, 0)),
        low: std::array::from_fn(|k| range(low, k, u32::MAX)),
        channel: std::array::from_fn(|k| channel_of(start + k)),
    }
}

/// How a group's lanes are added by levels: `keep` all ones for those
/// lanes (zero for the others: no value, bucketed, or not the group's),
/// `top` their largest magnitude's bound (|x| < 2^top), and the levels
/// (for x, for x²) the widest of them needs.
pub(super) struct Plan<const L: usize> {
    pub(super) keep: [u32; L],
    pub(super) top: [i32; L],
    pub(super) levels: (i32, i32),
}

/// The plan of a group; lanes with subnormals or too wide for the levels
/// are added by `spill` (buckets) here. None: no lane left for the
/// levels. NaN or ±Inf in a lane of the group: NonFinite.
#[inline(always)]
pub(super) fn plan<const L: usize>(
    vectors: &Vectors<L>,
    group: &Group<L>,
    wides: &mut [ChannelWide],
    spill: &mut Spill,
) -> Result<Option<Plan<L>>, ExactError> {
    let mut keep = [0u32; L];
    let mut top = [0i32; L];
    let mut span = None;
    for k in 0..L {
        let (high, low) = (group.high[k], group.low[k]);
        if !group.mine[k] || high == 0 {
            continue;
        }
        if high >= 0x7f80_0000 {
            return Err(ExactError::NonFinite);
        }
        // |x| < 2^top; every value is a multiple of 2^lowest.
        let (high_exponent, low_exponent) = (high >> 23, low.wrapping_add(1) >> 23);
        let lane_top = high_exponent as i32 - 126;
        let lowest = low_exponent as i32 - 150;
        if low_exponent == 0 || lane_top - lowest > MAX_LEVEL_SPAN {
            let wide = &mut wides[group.channel[k]];
            spill.add_lane(vectors, k, low_exponent, high_exponent, wide);
            continue;
        }
        keep[k] = u32::MAX;
        top[k] = lane_top;
        span = span.max(Some(lane_top - lowest));
    }
    Ok(span.map(|span| Plan {
        keep,
        top,
        levels: (levels_for(span), levels_for(2 * span)),
    }))
}

/// 1.5 · 2^(52 + q) as a float64 (−298 ≤ q ≤ 205 here: always normal).
fn magic(q: i32) -> f64 {
    f64::from_bits((((q + 52 + 1023) as u64) << 52) | (1 << 51))
}

/// The levels' exponents and constants, per level and lane: level j of
/// lane k takes x at 2^qx[j][k] (x² at 2^qs[j][k]), 52 bits below level
/// j − 1, the first 51 bits below the lane's top.
pub(super) struct Constants<const L: usize, const LX: usize, const LS: usize> {
    qx: [[i32; L]; LX],
    qs: [[i32; L]; LS],
    pub(super) cx: [[f64; L]; LX],
    pub(super) cs: [[f64; L]; LS],
}

impl<const L: usize, const LX: usize, const LS: usize> Constants<L, LX, LS> {
    #[inline(always)]
    pub(super) fn new(top: &[i32; L]) -> Self {
        // Level j's unit: 51 bits below the top, then 52 per level (never
        // below the lowest bit a value can have: closer levels are exact
        // too).
        let below = |j: usize| FIRST_LEVEL_BITS + LEVEL_BITS * j as i32;
        let qx: [[i32; L]; LX] =
            std::array::from_fn(|j| std::array::from_fn(|k| (top[k] - below(j)).max(X_LOWEST)));
        let qs: [[i32; L]; LS] = std::array::from_fn(|j| {
            std::array::from_fn(|k| (2 * top[k] - below(j)).max(X2_LOWEST))
        });
        Constants {
            qx,
            qs,
            cx: qx.map(|level| level.map(magic)),
            cs: qs.map(|level| level.map(magic)),
        }
    }
}

/// What a level kernel returns: per lane, `total[j]` and `negative[j]` sum
/// the raw bits of the j-th level's `x + C` (x signed: its level integers
/// too) over all values and over the negative ones (−0 included: it adds
/// nothing), `squares[j]` those of `x² + C`, `negatives` counts the
/// negative values, `count` the vectors (tail included). The constants'
/// bits are taken off by [`reduce`].
pub(super) struct LevelSums<const L: usize, const LX: usize, const LS: usize> {
    pub(super) total: [[i64; L]; LX],
    pub(super) negative: [[i64; L]; LX],
    pub(super) squares: [[i64; L]; LS],
    pub(super) negatives: [i64; L],
    pub(super) count: i64,
}

/// Adds the kept lanes' level sums into their channels' wide sums.
#[inline(always)]
pub(super) fn reduce<const L: usize, const LX: usize, const LS: usize>(
    sums: &LevelSums<L, LX, LS>,
    constants: &Constants<L, LX, LS>,
    keep: &[u32; L],
    channel: &[usize; L],
    wides: &mut [ChannelWide],
) {
    // Each lane's level sums are exact modulo 2^64 and below 2^63 in
    // magnitude, so the wrapped i64 is the sum.
    for k in 0..L {
        if keep[k] == 0 {
            continue;
        }
        let wide = &mut wides[channel[k]];
        for j in 0..LX {
            let constant = constants.cx[j][k].to_bits() as i64;
            let all = sums.total[j][k].wrapping_sub(constant.wrapping_mul(sums.count));
            let negative =
                sums.negative[j][k].wrapping_sub(constant.wrapping_mul(sums.negatives[k]));
            let shift = (constants.qx[j][k] - X_UNIT) as u32;
            // The negative values' levels are their signed integers: the
            // sum of |x| over them is minus theirs.
            wide.positive
                .add(i128::from(all) - i128::from(negative), shift);
            wide.negative.add(-i128::from(negative), shift);
        }
        for j in 0..LS {
            let constant = constants.cs[j][k].to_bits() as i64;
            let sum = sums.squares[j][k].wrapping_sub(constant.wrapping_mul(sums.count));
            wide.squares
                .add(i128::from(sum), (constants.qs[j][k] - X2_UNIT) as u32);
        }
    }
}

/// Defines, in the calling module, `accumulate` (its build of
/// [`super::accumulate`]) and the drivers it calls, for `$lanes` lanes,
/// every function with the given attributes (the build's target features)
/// and calling the module's kernel:
///
/// `fn levels<const LX: usize, const LS: usize>(vectors: &Vectors<L>, keep:
/// &[u32; L], constants: &Constants<L, LX, LS>) -> LevelSums<L, LX, LS>`
///
/// (lanes whose `keep` is 0 read as zeros).
macro_rules! lanes_build {
    ($lanes:literal $(, #[$attr:meta])*) => {
        use super::super::exact::{ChannelSums, ExactError, Layout};
        use super::lanes::{
            column_ranges, lane_ranges, plan, reduce, table_group, Constants, Group,
            LevelSums, Vectors,
        };
        use super::wide::{ChannelWide, Spill};
        use super::{BLOCK, DIRECT_RUN, MAX_ROWS, PANEL, ROW_BLOCK_BYTES, SHORT_RUN};

        const L: usize = $lanes;

        /// Adds a contiguous (N, C, inner) float32 buffer into `sums` (one
        /// per channel, empty). NaN or ±Inf anywhere: NonFinite.
        $(#[$attr])*
        pub(super) fn accumulate(
            data: &[f32],
            layout: &Layout,
            sums: &mut [ChannelSums],
        ) -> Result<(), ExactError> {
            let mut spill = Spill::default();
            let mut wides = vec![ChannelWide::ZERO; layout.channels];
            if layout.inner >= SHORT_RUN || layout.batch == 1 || layout.channels == 1 {
                accumulate_runs(data, layout, &mut wides, &mut spill)?;
            } else {
                accumulate_table(data, layout, &mut wides, &mut spill)?;
            }
            for (sum, wide) in sums.iter_mut().zip(wides) {
                *sum = wide.into_sums()?;
            }
            Ok(())
        }

        /// The channel runs: every channel's values in blocks.
        $(#[$attr])*
        #[inline]
        fn accumulate_runs(
            data: &[f32],
            layout: &Layout,
            wides: &mut [ChannelWide],
            spill: &mut Spill,
        ) -> Result<(), ExactError> {
            layout.walk_blocks(data, BLOCK, DIRECT_RUN, |block| {
                add_channel_block(block.values, block.channel, block.ahead, wides, spill)
            })
        }

        /// Adds one block of channel `channel`'s values: consecutive
        /// values in consecutive lanes, the last vector padded with zeros.
        $(#[$attr])*
        #[inline]
        fn add_channel_block(
            block: &[f32],
            channel: usize,
            ahead: &[f32],
            wides: &mut [ChannelWide],
            spill: &mut Spill,
        ) -> Result<(), ExactError> {
            let (main, rest) = block.split_at(block.len() / L * L);
            let tail = (!rest.is_empty()).then(|| {
                let mut tail = [0f32; L];
                tail[..rest.len()].copy_from_slice(rest);
                tail
            });
            let vectors = Vectors {
                values: main,
                stride: L,
                count: main.len() / L,
                tail,
                ahead,
            };
            let (high, low) = lane_ranges(&vectors);
            let group = Group {
                mine: [true; L],
                high,
                low,
                channel: [channel; L],
            };
            add_group(&vectors, &group, wides, spill)
        }

        /// The tables: (N, C, inner) as N rows of C · inner columns (or
        /// several input rows per table row when one is narrower than L; a
        /// last partial table row padded with zeros).
        $(#[$attr])*
        #[inline]
        fn accumulate_table(
            data: &[f32],
            layout: &Layout,
            wides: &mut [ChannelWide],
            spill: &mut Spill,
        ) -> Result<(), ExactError> {
            let (inner, row) = (layout.inner, layout.channels * layout.inner);
            let width = row * L.div_ceil(row);
            let rows = data.len() / width;
            let channel_of = |column: usize| (column % row) / inner;
            let (main, rest) = data.split_at(rows * width);
            add_table(main, width, rows, &channel_of, wides, spill)?;
            if !rest.is_empty() {
                let mut padded = vec![0f32; width];
                padded[..rest.len()].copy_from_slice(rest);
                add_table(&padded, width, 1, &channel_of, wides, spill)?;
            }
            Ok(())
        }

        /// A table of `rows` rows of `width` columns (at least L), column j
        /// of channel `channel_of(j)`: panels of at most PANEL columns, in
        /// blocks of rows; per block a first pass over all its columns
        /// (the ranges), then its groups of L columns.
        $(#[$attr])*
        #[inline]
        fn add_table(
            data: &[f32],
            width: usize,
            rows: usize,
            channel_of: &impl Fn(usize) -> usize,
            wides: &mut [ChannelWide],
            spill: &mut Spill,
        ) -> Result<(), ExactError> {
            let mut high = vec![0u32; PANEL.min(width)];
            let mut low = vec![u32::MAX; PANEL.min(width)];
            for panel_start in (0..width).step_by(PANEL) {
                let panel_end = (panel_start + PANEL).min(width);
                let panel_width = panel_end - panel_start;
                let block_rows = (ROW_BLOCK_BYTES / (4 * panel_width)).clamp(1, MAX_ROWS);
                for first_row in (0..rows).step_by(block_rows) {
                    let n = block_rows.min(rows - first_row);
                    let block = &data[first_row * width..];
                    let (high, low) = (&mut high[..panel_width], &mut low[..panel_width]);
                    column_ranges(block, width, n, panel_start..panel_end, high, low);
                    // The next block's values, a share per group (when the
                    // panel is the whole width: then they are contiguous).
                    let next_rows = block_rows.min(rows.saturating_sub(first_row + n));
                    let ahead = if panel_width == width {
                        &block[n * width..(n + next_rows) * width]
                    } else {
                        &[]
                    };
                    let share = ahead.len().div_ceil(panel_width.div_ceil(L)).max(1);
                    let mut shares = ahead.chunks(share);
                    // Groups of L columns; a last narrower one starts L
                    // columns before the panel's end (width >= L).
                    let mut next = panel_start;
                    while next < panel_end {
                        let start = if next + L <= panel_end { next } else { panel_end - L };
                        let group: Group<L> =
                            table_group(start, next, panel_start, high, low, channel_of);
                        let vectors = Vectors {
                            values: &block[start..],
                            stride: width,
                            count: n,
                            tail: None,
                            ahead: shares.next().unwrap_or_default(),
                        };
                        add_group(&vectors, &group, wides, spill)?;
                        next = start + L;
                    }
                }
            }
            Ok(())
        }

        /// Adds one block's lanes (those of `group.mine`).
        $(#[$attr])*
        #[inline]
        fn add_group(
            vectors: &Vectors<L>,
            group: &Group<L>,
            wides: &mut [ChannelWide],
            spill: &mut Spill,
        ) -> Result<(), ExactError> {
            if let Some(plan) = plan(vectors, group, wides, spill)? {
                let (keep, top, c) = (&plan.keep, &plan.top, &group.channel);
                match plan.levels {
                    (1, 1) => add_levels::<1, 1>(vectors, keep, top, c, wides),
                    (1, 2) => add_levels::<1, 2>(vectors, keep, top, c, wides),
                    (2, 3) => add_levels::<2, 3>(vectors, keep, top, c, wides),
                    (2, 4) => add_levels::<2, 4>(vectors, keep, top, c, wides),
                    (3, 5) => add_levels::<3, 5>(vectors, keep, top, c, wides),
                    (3, 6) => add_levels::<3, 6>(vectors, keep, top, c, wides),
                    _ => {
                        return Err(ExactError::Torch(
                            "internal: no levels for an exact float32 block".into(),
                        ))
                    }
                }
            }
            for (mine, &channel) in group.mine.iter().zip(&group.channel) {
                if *mine {
                    wides[channel].settle()?;
                }
            }
            Ok(())
        }

        /// Adds the kept lanes of `vectors` by levels: x at LX levels and
        /// x² at LS below each lane's `top`.
        $(#[$attr])*
        #[inline]
        fn add_levels<const LX: usize, const LS: usize>(
            vectors: &Vectors<L>,
            keep: &[u32; L],
            top: &[i32; L],
            channel: &[usize; L],
            wides: &mut [ChannelWide],
        ) {
            let constants = Constants::<L, LX, LS>::new(top);
            let sums: LevelSums<L, LX, LS> = levels(vectors, keep, &constants);
            reduce(&sums, &constants, keep, channel, wides);
        }
    };
}

pub(super) use lanes_build;
