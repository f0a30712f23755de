/*
 * Preloaded beside libfaketime by the clock test (tests/faults.rs): glibc's C11
 * cnd_timedwait, which librdkafka uses for every timed wait, calls the pthread wait
 * inside glibc, where libfaketime cannot see it. Its deadline then comes from the faked
 * wall clock and is waited for by the real one, and a clock set ahead delays every
 * librdkafka timer by the whole offset: a test artefact, since on a host whose clock is
 * wrong both agree. This passes the wait through the pthread function, which libfaketime
 * intercepts and translates, as glibc's own cnd_timedwait does.
 */
#include <errno.h>
#include <pthread.h>
#include <threads.h>

int cnd_timedwait(cnd_t *restrict cond, mtx_t *restrict mutex,
                  const struct timespec *restrict time_point) {
    int err = pthread_cond_timedwait((pthread_cond_t *)cond, (pthread_mutex_t *)mutex,
                                     time_point);
    switch (err) {
    case 0:
        return thrd_success;
    case ETIMEDOUT:
        return thrd_timedout;
    default:
        return thrd_error;
    }
}
