// The AMX tile state for our own tile kernels (amx_bf16.cc's GEMM, the CPU attention's bf16 path).
#pragma once

// Whether this build has the bf16 tile kernels and the kernel granted this process the tile state
// (asked once, as ggml's AMX buffer type does).
bool amx_tiles_granted();

// The tile shapes a scope configures.
//   kRows16x64: every tile 16 rows x 64 bytes (bf16 products over 32 of k).
//   kInt8Block32: int8 products over one 32-wide block of k: tiles 0-1 (A) 16 rows x 32 bytes, tiles
//   2-3 (B) 8 rows of 4-byte groups x 64 bytes, tiles 4-5 (C) 16 x 16 int32, and for a last group of
//   `rows` < 16 rows tiles 6 (A) and 7 (C) of that many rows.
enum class TileShapes { kRows16x64, kInt8Block32 };

// While alive: the tile registers configured as `shapes` says; the thread's previous configuration
// (ggml's int8 kernels configure each worker once and rely on it) is restored after.
class AmxTileScope {
 public:
  explicit AmxTileScope(TileShapes shapes = TileShapes::kRows16x64, int rows = 16);
  ~AmxTileScope();
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;

 private:
  alignas(64) unsigned char saved_[64];
};
