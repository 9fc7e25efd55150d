#include "speed/error.h"
