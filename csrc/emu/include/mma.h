// host emulation stand-in (csrc/emu/README.md)
#pragma once
#include "emu_cuda.h"
