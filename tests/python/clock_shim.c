/* A system clock that an operator (or NTP) steps: LD_PRELOADed into
 * zeotemp by tests/python/test_clock_step.py.
 *
 * Every CLOCK_REALTIME reading is shifted by the whole seconds written in
 * the file named by ZEOTEMP_CLOCK_OFFSET_FILE (e.g. "-7200": two hours
 * back), read again at each call, so a test steps the clock of a running
 * server by rewriting the file. Monotonic clocks are left alone, as a real
 * step leaves them. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);

int clock_gettime(clockid_t id, struct timespec *ts)
{
    if (!real_clock_gettime)
        real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real_clock_gettime(id, ts);
    if (r != 0 || (id != CLOCK_REALTIME && id != CLOCK_REALTIME_COARSE))
        return r;
    const char *path = getenv("ZEOTEMP_CLOCK_OFFSET_FILE");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (f) {
        long long offset = 0;
        if (fscanf(f, "%lld", &offset) == 1)
            ts->tv_sec += offset;
        fclose(f);
    }
    return r;
}
