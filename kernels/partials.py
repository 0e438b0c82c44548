"""How a column reduction over many rows splits its rows into partial sums, shared by `ia3_fold`'s column sums
and `lowrank_grads`'s reductions.

Why: a reduction with one program per column block leaves most of the GPU idle when the blocks are few (at
roberta-large size one pass over 4,096 rows took 75 us that way against 21 us split, bench/results/
ia3_parts-h200-2026-11-30.json). Splitting the rows so that column blocks x splits reach a minimum number of
programs, each split a whole number of row tiles, fills it; a second kernel adds the splits' partial sums.
"""

from __future__ import annotations

import triton


def row_split(rows: int, col_blocks: int, min_programs: int, block: int) -> tuple[int, int]:
    """(splits, rows per split): at least `min_programs` programs over `col_blocks` column blocks where the rows
    allow, every split but the last `rows per split` rows, a multiple of `block`."""
    split = max(1, min(triton.cdiv(min_programs, col_blocks), triton.cdiv(rows, block)))
    rows_per = triton.cdiv(triton.cdiv(rows, split), block) * block
    return triton.cdiv(rows, rows_per), rows_per
