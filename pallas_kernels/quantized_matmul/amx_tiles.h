// The AMX tile state for our own tile kernels (amx_bf16.cc's GEMM, the CPU attention's bf16 path).
#pragma once

// Whether this build has the bf16 tile kernels and the kernel granted this process the tile state
// (asked once, as ggml's AMX buffer type does).
bool amx_tiles_granted();

// While alive: every tile register configured as 16 rows x 64 bytes; the thread's previous
// configuration (ggml's int8 kernels configure each worker once and rely on it) is restored after.
class AmxTileScope {
 public:
  AmxTileScope();
  ~AmxTileScope();
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;

 private:
  alignas(64) unsigned char saved_[64];
};
