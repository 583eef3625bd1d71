/*
 * A simulated Ascend ACL runtime for CI: the subset of libascendcl that
 * vllm-mux's npu backend calls, with the same symbols and C signatures, on a
 * machine without an NPU. It is a test double, not an emulator: "device
 * memory" is host memory and device addresses are host virtual addresses.
 *
 * Every constant, layout and error code, and where each comes from, is listed
 * in SOURCES.md next to this file. Built with -DACL_SIM_REAL_HEADERS and -I
 * pointing at CANN's include directory, this file is compiled against the
 * real acl.h instead of its own declarations (the compiler then checks every
 * signature) and acl_sim_header_mismatches() compares the constants.
 *
 * State shared between processes lives in the directory $ACL_SIM_DIR:
 *   m-<id>        one physical allocation (a sparse file of its size). Every
 *                 holder keeps it open with a shared flock, so the memory is
 *                 alive exactly while someone holds it, and a process that
 *                 dies releases its holds with its descriptors.
 *   h-<share>     a shareable handle: struct share_rec. The exporter holds a
 *                 shared flock on it while the handle is alive.
 *   h-<share>.pids  the whitelist, int32 bare tgids appended by SetPid.
 *   counter       source of allocation ids and shareable handles.
 *   .lock         flock'ed around every change to the files above.
 * A file nobody holds a flock on is dead and is removed by the next scan.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef ACL_SIM_REAL_HEADERS
#include "acl/acl.h"
#else
/* The real header uses enums for these: 4 bytes each, the same ABI as int. */
typedef int aclError;
typedef void *aclrtDrvMemHandle;
typedef int aclrtMemAttr;
typedef int aclrtMemGranularityOptions;
typedef int aclrtMemHandleType;
typedef int aclrtMemcpyKind;
typedef struct aclrtMemLocation {
    uint32_t id;
    int type; /* aclrtMemLocationType */
} aclrtMemLocation;
typedef struct aclrtPhysicalMemProp {
    int handleType;     /* aclrtMemHandleType */
    int allocationType; /* aclrtMemAllocationType */
    aclrtMemAttr memAttr;
    aclrtMemLocation location;
    uint64_t reserve;
} aclrtPhysicalMemProp;
typedef struct aclrtUuid {
    char bytes[16];
} aclrtUuid;
#endif

#define EXPORT __attribute__((visibility("default")))

/* Values from CANN's acl_base_rt.h, rt_error_codes.h and acl_rt.h. */
enum {
    E_OK = 0,
    E_INVALID_PARAM = 100000,    /* ACL_ERROR_INVALID_PARAM */
    E_UNINITIALIZE = 100001,     /* ACL_ERROR_UNINITIALIZE */
    E_REPEAT_INIT = 100002,      /* ACL_ERROR_REPEAT_INITIALIZE */
    E_REPEAT_FINALIZE = 100037,  /* ACL_ERROR_REPEAT_FINALIZE */
    E_RT_PARAM = 107000,         /* ACL_ERROR_RT_PARAM_INVALID */
    E_RT_DEVICEID = 107001,      /* ACL_ERROR_RT_INVALID_DEVICEID */
    E_RT_CONTEXT_NULL = 107002,  /* ACL_ERROR_RT_CONTEXT_NULL */
    E_RT_HANDLE = 107017,        /* ACL_ERROR_RT_INVALID_HANDLE */
    E_RT_NOT_SUPPORT = 207000,   /* ACL_ERROR_RT_FEATURE_NOT_SUPPORT */
    E_RT_OOM = 207001,           /* ACL_ERROR_RT_MEMORY_ALLOCATION */
    E_RT_NO_PERMISSION = 207006, /* ACL_ERROR_RT_NO_PERMISSION */
    E_RT_DRV = 507899,           /* ACL_ERROR_RT_DRV_INTERNAL_ERROR */
};
enum { LOC_HOST = 0, LOC_DEVICE = 1, LOC_UNREGISTERED = 2, LOC_MANAGED = 3, LOC_HOST_NUMA = 4 };
enum { ATTR_HBM_MEM_HUGE = 4, ATTR_HBM_MEM_NORMAL = 5, ATTR_MEM_HUGE = 13, ATTR_LAST = 17 };
enum { GRAN_MINIMUM = 0, GRAN_RECOMMENDED = 1 };
enum { MEMCPY_KIND_LAST = 5 }; /* HOST_TO_HOST(0) .. HOST_TO_BUF_TO_DEVICE(5) */
#define VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION 0x1ULL

#define GRANULARITY ((size_t)2 << 20) /* ACL_HBM_MEM_HUGE: 2 MiB pages */
#define DEFAULT_DEVICE_BYTES ((size_t)1 << 30)

struct share_rec { /* the content of h-<share> */
    uint64_t mem_id;
    uint64_t size;
    int32_t exporter_pid;
    int32_t no_pid_check;
};

struct handle {
    struct handle *next;
    int fd; /* m-<id>, flock'ed shared: this process's hold on the memory */
    size_t size;
    uint64_t mem_id;
    bool imported;
    uint64_t share; /* exported or imported shareable handle, 0 if none */
    int hfd;        /* the exporter's open h-<share>, flock'ed while alive */
    int maps;       /* live mappings of this handle in this process */
    bool freed;     /* aclrtFreePhysical called; released at the last unmap */
};
struct reservation {
    struct reservation *next;
    char *base;
    size_t size;
};
struct mapping {
    struct mapping *next;
    char *addr;
    size_t size;
    struct handle *h;
};

/* Process-local tables; one mutex, taken by every entry point. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static bool g_inited, g_device_set;
static char g_dir[3072];
static size_t g_device_bytes;
static struct handle *g_handles;
static struct reservation *g_reservations;
static struct mapping *g_mappings;

/* aclGetRecentErrMsg is per thread by default and "gets and clears". */
static __thread char t_msg[1024];
static __thread bool t_has_msg;

static aclError fail(aclError code, const char *fn, const char *fmt, ...)
{
    int n = snprintf(t_msg, sizeof t_msg, "%s: ", fn);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_msg + n, sizeof t_msg - (size_t)n, fmt, ap);
    va_end(ap);
    t_has_msg = true;
    const char *v = getenv("ACL_SIM_VERBOSE");
    if (v != NULL && strcmp(v, "1") == 0)
        fprintf(stderr, "acl_sim[%d]: error %d: %s\n", (int)getpid(), code, t_msg);
    return code;
}
/* The API function being run by this thread, for the messages of its helpers. */
static __thread const char *t_api;
#define FAIL(code, ...) fail((code), t_api != NULL ? t_api : __func__, __VA_ARGS__)

/* Entry points run their do_* helper under g_mu through LOCKED. */
#define LOCKED(expr)                          \
    do {                                      \
        pthread_mutex_lock(&g_mu);            \
        t_api = __func__;                     \
        aclError rc_ = (expr);                \
        t_api = NULL;                         \
        pthread_mutex_unlock(&g_mu);          \
        return rc_;                           \
    } while (0)

static aclError ready(const char *fn)
{
    if (!g_inited)
        return fail(E_UNINITIALIZE, fn, "aclInit has not been called in this process");
    if (!g_device_set)
        return fail(E_RT_CONTEXT_NULL, fn, "aclrtSetDevice has not been called in this process");
    return E_OK;
}

static void path_of(char *buf, size_t n, const char *kind, uint64_t id, const char *suffix)
{
    snprintf(buf, n, "%s/%s%016llx%s", g_dir, kind, (unsigned long long)id, suffix);
}

static int dir_lock(void)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/.lock", g_dir);
    int fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0)
        flock(fd, LOCK_EX);
    return fd;
}

static void dir_unlock(int fd)
{
    if (fd >= 0)
        close(fd); /* drops the flock */
}

/* Whether anyone holds a flock on path; a dead file is removed. Dir lock held. */
static bool alive_or_remove(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return false;
    bool held = flock(fd, LOCK_EX | LOCK_NB) != 0;
    if (!held)
        unlink(path);
    close(fd);
    return held;
}

/* Bytes of physical memory alive in all processes; collects the dead. Dir lock held. */
static size_t used_bytes(void)
{
    size_t used = 0;
    DIR *d = opendir(g_dir);
    if (d == NULL)
        return 0;
    struct dirent *e;
    char p[4096];
    while ((e = readdir(d)) != NULL) {
        bool mem = strncmp(e->d_name, "m-", 2) == 0;
        bool share = strncmp(e->d_name, "h-", 2) == 0 && strchr(e->d_name, '.') == NULL;
        if (!mem && !share)
            continue;
        snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
        struct stat st;
        if (stat(p, &st) != 0 || !alive_or_remove(p)) {
            if (share) {
                strncat(p, ".pids", sizeof p - strlen(p) - 1);
                unlink(p);
            }
            continue;
        }
        if (mem)
            used += (size_t)st.st_size;
    }
    closedir(d);
    return used;
}

/* A new id, unique within $ACL_SIM_DIR: allocations and shareable handles.
 * The driver packs a shareable handle as devid << 32 | share_id; with device
 * 0 that is a 32-bit id, so ids stay below 2^31. Dir lock held. */
static uint64_t next_id(void)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/counter", g_dir);
    uint64_t v = 0;
    int fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return 0;
    if (pread(fd, &v, sizeof v, 0) != (ssize_t)sizeof v || v == 0)
        /* A random start, so a test that made up a handle does not hit one. */
        v = (((uint64_t)getpid() * 2654435761u) ^ (uint64_t)time(NULL)) % (1u << 30) + (1u << 20);
    v += 1;
    if (pwrite(fd, &v, sizeof v, 0) != (ssize_t)sizeof v)
        v = 0;
    close(fd);
    return v;
}

static struct handle *find_handle(aclrtDrvMemHandle p)
{
    for (struct handle *h = g_handles; h != NULL; h = h->next)
        if ((void *)h == p && !h->freed)
            return h;
    return NULL;
}

static struct handle *find_share(uint64_t share, bool imported)
{
    for (struct handle *h = g_handles; h != NULL; h = h->next)
        if (!h->freed && h->share == share && h->imported == imported)
            return h;
    return NULL;
}

/* Drops this process's hold; the memory goes when the last holder's does. */
static void destroy_handle(struct handle *h)
{
    for (struct handle **pp = &g_handles; *pp != NULL; pp = &(*pp)->next)
        if (*pp == h) {
            *pp = h->next;
            break;
        }
    close(h->fd);
    int lk = dir_lock();
    char p[4096];
    path_of(p, sizeof p, "m-", h->mem_id, "");
    alive_or_remove(p);
    dir_unlock(lk);
    free(h);
}

static struct handle *new_handle(int fd, size_t size, uint64_t mem_id)
{
    struct handle *h = calloc(1, sizeof *h);
    if (h == NULL)
        return NULL;
    h->fd = fd;
    h->size = size;
    h->mem_id = mem_id;
    h->hfd = -1;
    h->next = g_handles;
    g_handles = h;
    return h;
}

/* The checks aclrtMallocPhysical and aclrtMemGetAllocationGranularity share. */
static aclError check_prop(const char *fn, const aclrtPhysicalMemProp *prop)
{
    int type = (int)prop->location.type, attr = (int)prop->memAttr;
    if ((int)prop->handleType != 0)
        return fail(E_INVALID_PARAM, fn, "prop->handleType must be ACL_MEM_HANDLE_TYPE_NONE (0), got %d",
                    (int)prop->handleType);
    if ((int)prop->allocationType != 0)
        return fail(E_INVALID_PARAM, fn,
                    "prop->allocationType must be ACL_MEM_ALLOCATION_TYPE_PINNED (0), got %d",
                    (int)prop->allocationType);
    if (type == LOC_HOST || type == LOC_HOST_NUMA)
        return fail(E_RT_NOT_SUPPORT, fn, "host memory (location.type %d) is not simulated", type);
    if (type != LOC_DEVICE)
        return fail(E_INVALID_PARAM, fn, "prop->location.type %d is invalid", type);
    if (attr == 0 || attr == 2 || attr == 3 || attr == 6 || attr == 7)
        return fail(E_INVALID_PARAM, fn, "memAttr %d (DDR) needs a host location", attr);
    if (attr < 0 || attr > ATTR_LAST)
        return fail(E_INVALID_PARAM, fn, "memAttr %d is not an aclrtMemAttr", attr);
    if (attr != ATTR_HBM_MEM_HUGE && attr != ATTR_HBM_MEM_NORMAL && attr != ATTR_MEM_HUGE)
        return fail(E_RT_NOT_SUPPORT, fn,
                    "memAttr %d is not simulated (only 2 MiB pages: ACL_HBM_MEM_HUGE 4, "
                    "ACL_HBM_MEM_NORMAL 5, ACL_MEM_HUGE 13)", attr);
    if (prop->location.id != 0)
        return fail(E_RT_DEVICEID, fn, "device %u does not exist (the simulator has device 0)",
                    prop->location.id);
    return E_OK;
}

/* ---- initialisation and devices ---- */

static aclError do_init(void)
{
    if (g_inited)
        return FAIL(E_REPEAT_INIT, "aclInit was already called in this process");
    const char *d = getenv("ACL_SIM_DIR");
    if (d == NULL || *d == '\0')
        return FAIL(E_RT_PARAM, "ACL_SIM_DIR is not set: the simulated runtime keeps the "
                                "device's shared state in that directory");
    if (strlen(d) >= sizeof g_dir)
        return FAIL(E_RT_PARAM, "ACL_SIM_DIR is too long");
    struct stat st;
    if ((mkdir(d, 0700) != 0 && errno != EEXIST) || stat(d, &st) != 0 || !S_ISDIR(st.st_mode))
        return FAIL(E_RT_PARAM, "ACL_SIM_DIR=%s is not a usable directory", d);
    size_t bytes = DEFAULT_DEVICE_BYTES;
    const char *b = getenv("ACL_SIM_DEVICE_BYTES");
    if (b != NULL && *b != '\0') {
        char *end;
        unsigned long long v = strtoull(b, &end, 10);
        if (*end != '\0' || v < GRANULARITY)
            return FAIL(E_RT_PARAM, "ACL_SIM_DEVICE_BYTES=%s is not a byte count >= 2 MiB", b);
        bytes = (size_t)v / GRANULARITY * GRANULARITY;
    }
    strcpy(g_dir, d);
    g_device_bytes = bytes;
    g_inited = true;
    return E_OK;
}

EXPORT aclError aclInit(const char *configPath)
{
    (void)configPath; /* a JSON config in CANN; nothing in it is simulated */
    LOCKED(do_init());
}

EXPORT aclError aclFinalize(void)
{
    pthread_mutex_lock(&g_mu);
    bool was = g_inited;
    g_inited = g_device_set = false;
    pthread_mutex_unlock(&g_mu);
    return was ? E_OK : FAIL(E_REPEAT_FINALIZE, "aclInit was not called, or aclFinalize already was");
}

EXPORT const char *aclGetRecentErrMsg(void)
{
    if (!t_has_msg)
        return NULL;
    t_has_msg = false;
    return t_msg;
}

static aclError do_set_device(int32_t id, bool set)
{
    if (!g_inited)
        return FAIL(E_UNINITIALIZE, "aclInit has not been called in this process");
    if (id != 0)
        return FAIL(E_RT_DEVICEID, "device %d does not exist (the simulator has device 0)", (int)id);
    g_device_set = set;
    return E_OK;
}

EXPORT aclError aclrtSetDevice(int32_t deviceId) { LOCKED(do_set_device(deviceId, true)); }

EXPORT aclError aclrtResetDevice(int32_t deviceId) { LOCKED(do_set_device(deviceId, false)); }

static aclError do_get_device(int32_t *id)
{
    aclError rc = ready("aclrtGetDevice");
    if (rc != E_OK)
        return rc;
    if (id == NULL)
        return FAIL(E_INVALID_PARAM, "deviceId is NULL");
    *id = 0;
    return E_OK;
}

EXPORT aclError aclrtGetDevice(int32_t *deviceId) { LOCKED(do_get_device(deviceId)); }

EXPORT aclError aclrtSynchronizeDevice(void) { LOCKED(ready("aclrtSynchronizeDevice")); }

EXPORT aclError aclrtDeviceGetBareTgid(int32_t *pid)
{
    if (pid == NULL)
        return FAIL(E_INVALID_PARAM, "pid is NULL");
    *pid = (int32_t)getpid(); /* no containers here: the bare tgid is the pid */
    return E_OK;
}

#ifndef ACL_SIM_NO_UUID /* CANN 9.0 added it: -DACL_SIM_NO_UUID is an older runtime */
/* One simulated device, one UUID: made once in $ACL_SIM_DIR, read by every
 * process sharing it (a device's identity whatever its index there). */
static aclError do_get_uuid(int32_t deviceId, aclrtUuid *uuid)
{
    if (g_dir[0] == '\0')
        return FAIL(E_UNINITIALIZE, "aclrtDeviceGetUuid before aclInit");
    if (uuid == NULL)
        return FAIL(E_INVALID_PARAM, "uuid is NULL");
    if (deviceId != 0)
        return FAIL(E_RT_DEVICEID, "device %d does not exist (only device 0 is simulated)",
                    (int)deviceId);
    char p[4096];
    snprintf(p, sizeof p, "%s/uuid", g_dir);
    int lk = dir_lock();
    int fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    aclError rc = E_OK;
    if (fd < 0 || pread(fd, uuid->bytes, sizeof uuid->bytes, 0) != (ssize_t)sizeof uuid->bytes) {
        uint64_t seed = ((uint64_t)getpid() << 32) ^ (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)p;
        for (size_t i = 0; i < sizeof uuid->bytes; i++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            uuid->bytes[i] = (char)(seed >> 56);
        }
        if (fd < 0 || pwrite(fd, uuid->bytes, sizeof uuid->bytes, 0) != (ssize_t)sizeof uuid->bytes)
            rc = FAIL(E_RT_DRV, "cannot keep the device's uuid in %s: %s", p, strerror(errno));
    }
    if (fd >= 0)
        close(fd);
    dir_unlock(lk);
    return rc;
}

EXPORT aclError aclrtDeviceGetUuid(int32_t deviceId, aclrtUuid *uuid)
{
    LOCKED(do_get_uuid(deviceId, uuid));
}
#endif

static aclError do_get_mem_info(aclrtMemAttr attr, size_t *free_, size_t *total)
{
    aclError rc = ready("aclrtGetMemInfo");
    if (rc != E_OK)
        return rc;
    if (free_ == NULL || total == NULL)
        return FAIL(E_INVALID_PARAM, "free or total is NULL");
    int a = (int)attr;
    if (a < 0 || a > ATTR_LAST)
        return FAIL(E_INVALID_PARAM, "attr %d is not an aclrtMemAttr", a);
    if (a == 0 || a == 2 || a == 3 || a == 6 || a == 7)
        return FAIL(E_RT_NOT_SUPPORT, "attr %d is host (DDR) memory, which is not simulated", a);
    int lk = dir_lock();
    size_t used = used_bytes();
    dir_unlock(lk);
    *total = g_device_bytes;
    *free_ = used < g_device_bytes ? g_device_bytes - used : 0;
    return E_OK;
}

EXPORT aclError aclrtGetMemInfo(aclrtMemAttr attr, size_t *free, size_t *total)
{
    LOCKED(do_get_mem_info(attr, free, total));
}

static aclError do_granularity(aclrtPhysicalMemProp *prop, int option, size_t *granularity)
{
    aclError rc = ready("aclrtMemGetAllocationGranularity");
    if (rc != E_OK)
        return rc;
    if (prop == NULL || granularity == NULL)
        return FAIL(E_INVALID_PARAM, "prop or granularity is NULL");
    if ((rc = check_prop("aclrtMemGetAllocationGranularity", prop)) != E_OK)
        return rc;
    if (option != GRAN_MINIMUM && option != GRAN_RECOMMENDED)
        return FAIL(E_RT_PARAM, "option %d is not an aclrtMemGranularityOptions", option);
    *granularity = GRANULARITY;
    return E_OK;
}

EXPORT aclError aclrtMemGetAllocationGranularity(aclrtPhysicalMemProp *prop,
                                                 aclrtMemGranularityOptions option,
                                                 size_t *granularity)
{
    LOCKED(do_granularity(prop, (int)option, granularity));
}

/* ---- physical memory ---- */

static aclError do_malloc(aclrtDrvMemHandle *out, size_t size, const aclrtPhysicalMemProp *prop,
                          uint64_t flags)
{
    aclError rc = ready("aclrtMallocPhysical");
    if (rc != E_OK)
        return rc;
    if (out == NULL || prop == NULL)
        return FAIL(E_INVALID_PARAM, "handle or prop is NULL");
    if (size == 0)
        return FAIL(E_INVALID_PARAM, "size is 0");
    if (flags != 0)
        return FAIL(E_INVALID_PARAM, "flags must be 0, got %llu", (unsigned long long)flags);
    if ((rc = check_prop("aclrtMallocPhysical", prop)) != E_OK)
        return rc;
    if (size % GRANULARITY != 0)
        return FAIL(E_RT_PARAM, "size %zu is not a multiple of the granularity (%zu)", size,
                    GRANULARITY);
    int lk = dir_lock();
    size_t used = used_bytes();
    if (used + size > g_device_bytes) {
        dir_unlock(lk);
        return FAIL(E_RT_OOM, "out of device memory: %zu bytes asked, %zu of %zu in use", size, used,
                    g_device_bytes);
    }
    uint64_t id = next_id();
    char p[4096];
    path_of(p, sizeof p, "m-", id, "");
    int fd = id == 0 ? -1 : open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0 || flock(fd, LOCK_SH) != 0) {
        int err = errno;
        if (fd >= 0) {
            close(fd);
            unlink(p);
        }
        dir_unlock(lk);
        return FAIL(E_RT_DRV, "cannot create %s: %s", p, strerror(err));
    }
    dir_unlock(lk);
    struct handle *h = new_handle(fd, size, id);
    if (h == NULL) {
        close(fd);
        return FAIL(E_RT_OOM, "out of host memory");
    }
    *out = h;
    return E_OK;
}

EXPORT aclError aclrtMallocPhysical(aclrtDrvMemHandle *handle, size_t size,
                                    const aclrtPhysicalMemProp *prop, uint64_t flags)
{
    LOCKED(do_malloc(handle, size, prop, flags));
}

static aclError do_free(aclrtDrvMemHandle p)
{
    aclError rc = ready("aclrtFreePhysical");
    if (rc != E_OK)
        return rc;
    if (p == NULL)
        return FAIL(E_INVALID_PARAM, "handle is NULL");
    struct handle *h = find_handle(p);
    if (h == NULL)
        return FAIL(E_RT_PARAM, "%p is not a live handle of this process (freed twice?)", p);
    h->freed = true;
    if (h->hfd >= 0) {
        /* The shareable handle dies with the exporter's handle: importers
         * that hold it keep their memory, but nobody can import it anew. */
        char s[4096];
        int lk = dir_lock();
        path_of(s, sizeof s, "h-", h->share, "");
        unlink(s);
        path_of(s, sizeof s, "h-", h->share, ".pids");
        unlink(s);
        dir_unlock(lk);
        close(h->hfd);
        h->hfd = -1;
    }
    /* CANN: freeing a mapped handle succeeds; the memory goes at the unmap. */
    if (h->maps == 0)
        destroy_handle(h);
    return E_OK;
}

EXPORT aclError aclrtFreePhysical(aclrtDrvMemHandle handle) { LOCKED(do_free(handle)); }

/* ---- virtual address ranges ---- */

static aclError do_reserve(void **out, size_t size, size_t alignment, void *expect, uint64_t flags)
{
    aclError rc = ready("aclrtReserveMemAddress");
    if (rc != E_OK)
        return rc;
    if (out == NULL)
        return FAIL(E_INVALID_PARAM, "virPtr is NULL");
    if (size == 0)
        return FAIL(E_INVALID_PARAM, "size is 0");
    if (flags > 1) /* 0, or 1 kept for old callers (CANN's own check) */
        return FAIL(E_INVALID_PARAM, "flags must be 0, got %llu", (unsigned long long)flags);
    if (alignment != 0) /* "reserved, 0" in CANN's docs: vllm-ascend passes 0 */
        return FAIL(E_INVALID_PARAM, "alignment must be 0, got %zu", alignment);
    if (size % GRANULARITY != 0)
        return FAIL(E_RT_PARAM, "size %zu is not a multiple of 2 MiB", size);
    size_t align = GRANULARITY;
    char *base;
    if (expect != NULL) {
        if ((uintptr_t)expect % align != 0)
            return FAIL(E_RT_PARAM, "expectPtr %p is not aligned to %zu", expect, align);
        base = mmap(expect, size, PROT_NONE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
        if (base == MAP_FAILED || base != (char *)expect) {
            if (base != MAP_FAILED)
                munmap(base, size);
            return FAIL(E_RT_PARAM, "the range at expectPtr %p is not free", expect);
        }
    } else {
        /* Over-reserve, then trim to the alignment. */
        char *raw = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                         -1, 0);
        if (raw == MAP_FAILED)
            return FAIL(E_RT_OOM, "cannot reserve %zu bytes: %s", size, strerror(errno));
        base = (char *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
        if (base > raw)
            munmap(raw, (size_t)(base - raw));
        if (raw + size + align > base + size)
            munmap(base + size, (size_t)(raw + size + align - (base + size)));
    }
    struct reservation *r = calloc(1, sizeof *r);
    if (r == NULL) {
        munmap(base, size);
        return FAIL(E_RT_OOM, "out of host memory");
    }
    r->base = base;
    r->size = size;
    r->next = g_reservations;
    g_reservations = r;
    *out = base;
    return E_OK;
}

EXPORT aclError aclrtReserveMemAddress(void **virPtr, size_t size, size_t alignment, void *expectPtr,
                                       uint64_t flags)
{
    LOCKED(do_reserve(virPtr, size, alignment, expectPtr, flags));
}

static aclError do_release(void *p)
{
    aclError rc = ready("aclrtReleaseMemAddress");
    if (rc != E_OK)
        return rc;
    if (p == NULL)
        return FAIL(E_INVALID_PARAM, "virPtr is NULL");
    struct reservation **pp = &g_reservations;
    while (*pp != NULL && (*pp)->base != (char *)p)
        pp = &(*pp)->next;
    struct reservation *r = *pp;
    if (r == NULL)
        return FAIL(E_RT_PARAM, "%p is not the start of a reservation", p);
    for (struct mapping *m = g_mappings; m != NULL; m = m->next)
        if (m->addr >= r->base && m->addr < r->base + r->size)
            return FAIL(E_RT_DRV, "the reservation at %p still has a mapping at %p: unmap first", p,
                        (void *)m->addr);
    *pp = r->next;
    munmap(r->base, r->size);
    free(r);
    return E_OK;
}

EXPORT aclError aclrtReleaseMemAddress(void *virPtr) { LOCKED(do_release(virPtr)); }

static aclError do_map(void *ptr, size_t size, size_t offset, aclrtDrvMemHandle hp, uint64_t flags)
{
    aclError rc = ready("aclrtMapMem");
    if (rc != E_OK)
        return rc;
    char *va = ptr;
    if (va == NULL || hp == NULL)
        return FAIL(E_INVALID_PARAM, "virPtr or handle is NULL");
    if (size == 0)
        return FAIL(E_INVALID_PARAM, "size is 0");
    if (flags != 0)
        return FAIL(E_INVALID_PARAM, "flags must be 0, got %llu", (unsigned long long)flags);
    if (offset != 0)
        return FAIL(E_RT_PARAM, "offset must be 0, got %zu", offset);
    struct handle *h = find_handle(hp);
    if (h == NULL)
        return FAIL(E_RT_PARAM, "%p is not a live handle of this process", hp);
    if ((uintptr_t)va % GRANULARITY != 0)
        return FAIL(E_RT_DRV, "virPtr %p is not 2 MiB-aligned", ptr);
    struct reservation *r = g_reservations;
    while (r != NULL && !(va >= r->base && va < r->base + r->size))
        r = r->next;
    if (r == NULL || size > (size_t)(r->base + r->size - va))
        return FAIL(E_RT_DRV, "[%p, +%zu) is not inside one reservation", ptr, size);
    if (size != h->size)
        return FAIL(E_RT_DRV, "size %zu is not the allocation's size %zu (map it whole)", size,
                    h->size);
    for (struct mapping *m = g_mappings; m != NULL; m = m->next)
        if (va < m->addr + m->size && m->addr < va + size)
            return FAIL(E_RT_DRV, "[%p, +%zu) overlaps the mapping at %p", ptr, size, (void *)m->addr);
    struct mapping *m = calloc(1, sizeof *m);
    if (m == NULL)
        return FAIL(E_RT_OOM, "out of host memory");
    if (mmap(va, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, h->fd, 0) == MAP_FAILED) {
        free(m);
        return FAIL(E_RT_DRV, "mmap failed: %s", strerror(errno));
    }
    m->addr = va;
    m->size = size;
    m->h = h;
    m->next = g_mappings;
    g_mappings = m;
    h->maps++;
    return E_OK;
}

EXPORT aclError aclrtMapMem(void *virPtr, size_t size, size_t offset, aclrtDrvMemHandle handle,
                            uint64_t flags)
{
    LOCKED(do_map(virPtr, size, offset, handle, flags));
}

static aclError do_unmap(void *ptr)
{
    aclError rc = ready("aclrtUnmapMem");
    if (rc != E_OK)
        return rc;
    if (ptr == NULL)
        return FAIL(E_INVALID_PARAM, "virPtr is NULL");
    struct mapping **pp = &g_mappings;
    while (*pp != NULL && (*pp)->addr != (char *)ptr)
        pp = &(*pp)->next;
    struct mapping *m = *pp;
    if (m == NULL)
        return FAIL(E_RT_DRV, "%p is not the start of a mapping", ptr);
    /* Back to an inaccessible part of the reservation, as after reserving. */
    if (mmap(m->addr, m->size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
             -1, 0) == MAP_FAILED)
        return FAIL(E_RT_DRV, "mmap failed: %s", strerror(errno));
    *pp = m->next;
    struct handle *h = m->h;
    free(m);
    if (--h->maps == 0 && h->freed)
        destroy_handle(h);
    return E_OK;
}

EXPORT aclError aclrtUnmapMem(void *virPtr) { LOCKED(do_unmap(virPtr)); }

/* ---- sharing between processes ---- */

static aclError do_export(aclrtDrvMemHandle hp, int type, uint64_t flags, uint64_t *out)
{
    aclError rc = ready("aclrtMemExportToShareableHandle");
    if (rc != E_OK)
        return rc;
    if (hp == NULL || out == NULL)
        return FAIL(E_INVALID_PARAM, "handle or shareableHandle is NULL");
    if (type != 0)
        return FAIL(E_INVALID_PARAM, "handleType must be ACL_MEM_HANDLE_TYPE_NONE (0), got %d", type);
    if (flags > VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION)
        return FAIL(E_RT_PARAM, "flags must be 0 or ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION (1)");
    struct handle *h = find_handle(hp);
    if (h == NULL)
        return FAIL(E_RT_PARAM, "%p is not a live handle of this process", hp);
    if (h->imported)
        return FAIL(E_RT_DRV, "an imported handle cannot be exported (only aclrtMallocPhysical's)");
    if (h->share != 0)
        return FAIL(E_RT_DRV, "this handle was already exported (as %llu): export once",
                    (unsigned long long)h->share);
    struct share_rec rec = {h->mem_id, h->size, (int32_t)getpid(),
                            (flags & VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION) != 0};
    int lk = dir_lock();
    uint64_t share = next_id();
    char p[4096];
    path_of(p, sizeof p, "h-", share, "");
    int fd = share == 0 ? -1 : open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, &rec, sizeof rec) != (ssize_t)sizeof rec || flock(fd, LOCK_SH) != 0) {
        int err = errno;
        if (fd >= 0) {
            close(fd);
            unlink(p);
        }
        dir_unlock(lk);
        return FAIL(E_RT_DRV, "cannot create %s: %s", p, strerror(err));
    }
    dir_unlock(lk);
    h->share = share;
    h->hfd = fd;
    *out = share;
    return E_OK;
}

EXPORT aclError aclrtMemExportToShareableHandle(aclrtDrvMemHandle handle,
                                                aclrtMemHandleType handleType, uint64_t flags,
                                                uint64_t *shareableHandle)
{
    LOCKED(do_export(handle, (int)handleType, flags, shareableHandle));
}

/* Reads a live shareable handle's record. Dir lock held. */
static bool read_share(uint64_t share, struct share_rec *rec)
{
    char p[4096];
    path_of(p, sizeof p, "h-", share, "");
    if (!alive_or_remove(p)) {
        path_of(p, sizeof p, "h-", share, ".pids");
        unlink(p);
        return false;
    }
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    bool ok = fd >= 0 && pread(fd, rec, sizeof *rec, 0) == (ssize_t)sizeof *rec;
    if (fd >= 0)
        close(fd);
    return ok;
}

static aclError do_set_pid(uint64_t share, int32_t *pids, size_t n)
{
    aclError rc = ready("aclrtMemSetPidToShareableHandle");
    if (rc != E_OK)
        return rc;
    if (pids == NULL || n == 0)
        return FAIL(E_INVALID_PARAM, "pid is NULL or pidNum is 0");
    struct handle *h = find_share(share, false);
    if (h == NULL || h->hfd < 0) {
        struct share_rec rec;
        int lk = dir_lock();
        bool exists = read_share(share, &rec);
        dir_unlock(lk);
        if (!exists)
            return FAIL(E_RT_HANDLE, "shareable handle %llu does not exist (or was freed)",
                        (unsigned long long)share);
        return FAIL(E_RT_DRV, "only the exporting process (pid %d) may set the whitelist",
                    (int)rec.exporter_pid);
    }
    struct share_rec rec;
    if (pread(h->hfd, &rec, sizeof rec, 0) != (ssize_t)sizeof rec)
        return FAIL(E_RT_DRV, "cannot read the shareable handle's record");
    if (rec.no_pid_check)
        return FAIL(E_RT_NO_PERMISSION, "handle %llu was exported with "
                    "ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION: it has no whitelist",
                    (unsigned long long)share);
    size_t set = 0;
    for (size_t i = 0; i < n; i++)
        set += pids[i] != 0; /* the driver skips pid 0 */
    if (set == 0)
        return FAIL(E_RT_DRV, "no valid pid (all are 0)");
    char p[4096];
    path_of(p, sizeof p, "h-", share, ".pids");
    int lk = dir_lock();
    int fd = open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    bool ok = fd >= 0;
    for (size_t i = 0; ok && i < n; i++)
        if (pids[i] != 0)
            ok = write(fd, &pids[i], sizeof pids[i]) == (ssize_t)sizeof pids[i];
    if (fd >= 0)
        close(fd);
    dir_unlock(lk);
    return ok ? E_OK : FAIL(E_RT_DRV, "cannot write %s", p);
}

EXPORT aclError aclrtMemSetPidToShareableHandle(uint64_t shareableHandle, int32_t *pid,
                                                size_t pidNum)
{
    LOCKED(do_set_pid(shareableHandle, pid, pidNum));
}

static bool whitelisted(uint64_t share, int32_t pid)
{
    char p[4096];
    path_of(p, sizeof p, "h-", share, ".pids");
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    int32_t v;
    bool found = false;
    while (!found && read(fd, &v, sizeof v) == (ssize_t)sizeof v)
        found = v == pid;
    close(fd);
    return found;
}

static aclError do_import(uint64_t share, int32_t device, aclrtDrvMemHandle *out)
{
    aclError rc = ready("aclrtMemImportFromShareableHandle");
    if (rc != E_OK)
        return rc;
    if (out == NULL)
        return FAIL(E_INVALID_PARAM, "handle is NULL");
    if (device != 0)
        return FAIL(E_RT_DEVICEID, "device %d does not exist (the simulator has device 0)",
                    (int)device);
    struct handle *mine = find_share(share, false);
    if (mine != NULL && mine->hfd >= 0)
        return FAIL(E_RT_DRV, "the exporting process cannot import its own shareable handle");
    if (find_share(share, true) != NULL)
        return FAIL(E_RT_HANDLE, "shareable handle %llu is already imported in this process: "
                    "free that handle before importing again", (unsigned long long)share);
    int lk = dir_lock();
    struct share_rec rec;
    if (!read_share(share, &rec)) {
        dir_unlock(lk);
        return FAIL(E_RT_HANDLE, "shareable handle %llu does not exist (or its exporter freed it)",
                    (unsigned long long)share);
    }
    if (rec.exporter_pid == (int32_t)getpid()) {
        dir_unlock(lk);
        return FAIL(E_RT_DRV, "the exporting process cannot import its own shareable handle");
    }
    if (!rec.no_pid_check && !whitelisted(share, (int32_t)getpid())) {
        dir_unlock(lk);
        return FAIL(E_RT_DRV, "pid %d is not on the whitelist of shareable handle %llu "
                    "(aclrtMemSetPidToShareableHandle in the exporter)", (int)getpid(),
                    (unsigned long long)share);
    }
    char p[4096];
    path_of(p, sizeof p, "m-", rec.mem_id, "");
    int fd = open(p, O_RDWR | O_CLOEXEC);
    if (fd < 0 || flock(fd, LOCK_SH) != 0) {
        if (fd >= 0)
            close(fd);
        dir_unlock(lk);
        return FAIL(E_RT_HANDLE, "the memory of shareable handle %llu is gone",
                    (unsigned long long)share);
    }
    dir_unlock(lk);
    struct handle *h = new_handle(fd, (size_t)rec.size, rec.mem_id);
    if (h == NULL) {
        close(fd);
        return FAIL(E_RT_OOM, "out of host memory");
    }
    h->imported = true;
    h->share = share;
    *out = h;
    return E_OK;
}

EXPORT aclError aclrtMemImportFromShareableHandle(uint64_t shareableHandle, int32_t deviceId,
                                                  aclrtDrvMemHandle *handle)
{
    LOCKED(do_import(shareableHandle, deviceId, handle));
}

/* ---- copies ---- */

static aclError do_memcpy(void *dst, size_t destMax, const void *src, size_t count, int kind)
{
    aclError rc = ready("aclrtMemcpy");
    if (rc != E_OK)
        return rc;
    if (count == 0)
        return E_OK; /* CANN returns success before any other check */
    if (dst == NULL || src == NULL)
        return FAIL(E_INVALID_PARAM, "dst or src is NULL");
    if (kind < 0 || kind > MEMCPY_KIND_LAST)
        return FAIL(E_INVALID_PARAM, "kind %d is not a supported aclrtMemcpyKind", kind);
    if (count > destMax)
        return FAIL(E_RT_PARAM, "count %zu is larger than destMax %zu", count, destMax);
    memmove(dst, src, count); /* host and "device" are one address space here */
    return E_OK;
}

EXPORT aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count,
                            aclrtMemcpyKind kind)
{
    LOCKED(do_memcpy(dst, destMax, src, count, (int)kind));
}

/* ---- checks against CANN's own header ---- */

/* Number of constants or layouts that differ from the real header, or -1 when
 * this library was not built against it (-DACL_SIM_REAL_HEADERS). */
EXPORT int acl_sim_header_mismatches(void)
{
#ifdef ACL_SIM_REAL_HEADERS
    int bad = 0;
#define SAME(ours, theirs)                                                              \
    if ((long long)(ours) != (long long)(theirs)) {                                     \
        fprintf(stderr, "acl_sim: %s is %lld here, %lld in CANN's header\n", #theirs,   \
                (long long)(ours), (long long)(theirs));                                \
        bad++;                                                                          \
    }
    SAME(E_INVALID_PARAM, ACL_ERROR_INVALID_PARAM);
    SAME(E_UNINITIALIZE, ACL_ERROR_UNINITIALIZE);
    SAME(E_REPEAT_INIT, ACL_ERROR_REPEAT_INITIALIZE);
    SAME(E_REPEAT_FINALIZE, ACL_ERROR_REPEAT_FINALIZE);
    SAME(E_RT_PARAM, ACL_ERROR_RT_PARAM_INVALID);
    SAME(E_RT_DEVICEID, ACL_ERROR_RT_INVALID_DEVICEID);
    SAME(E_RT_CONTEXT_NULL, ACL_ERROR_RT_CONTEXT_NULL);
    SAME(E_RT_HANDLE, ACL_ERROR_RT_INVALID_HANDLE);
    SAME(E_RT_NOT_SUPPORT, ACL_ERROR_RT_FEATURE_NOT_SUPPORT);
    SAME(E_RT_OOM, ACL_ERROR_RT_MEMORY_ALLOCATION);
    SAME(E_RT_NO_PERMISSION, ACL_ERROR_RT_NO_PERMISSION);
    SAME(E_RT_DRV, ACL_ERROR_RT_DRV_INTERNAL_ERROR);
    SAME(LOC_HOST, ACL_MEM_LOCATION_TYPE_HOST);
    SAME(LOC_DEVICE, ACL_MEM_LOCATION_TYPE_DEVICE);
    SAME(LOC_UNREGISTERED, ACL_MEM_LOCATION_TYPE_UNREGISTERED);
    SAME(LOC_HOST_NUMA, ACL_MEM_LOCATION_TYPE_HOST_NUMA);
    SAME(ATTR_HBM_MEM_HUGE, ACL_HBM_MEM_HUGE);
    SAME(ATTR_HBM_MEM_NORMAL, ACL_HBM_MEM_NORMAL);
    SAME(ATTR_MEM_HUGE, ACL_MEM_HUGE);
    SAME(ATTR_LAST, ACL_MEM_P2P_HUGE1G);
    SAME(0, ACL_MEM_HANDLE_TYPE_NONE);
    SAME(0, ACL_MEM_ALLOCATION_TYPE_PINNED);
    SAME(GRAN_MINIMUM, ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM);
    SAME(GRAN_RECOMMENDED, ACL_RT_MEM_ALLOC_GRANULARITY_RECOMMENDED);
    SAME(MEMCPY_KIND_LAST, ACL_MEMCPY_HOST_TO_BUF_TO_DEVICE);
    SAME(0, ACL_MEMCPY_HOST_TO_HOST);
    SAME(VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION, ACL_RT_VMM_EXPORT_FLAG_DISABLE_PID_VALIDATION);
    SAME(32, sizeof(aclrtPhysicalMemProp));
    SAME(8, offsetof(aclrtPhysicalMemProp, memAttr));
    SAME(12, offsetof(aclrtPhysicalMemProp, location));
    SAME(16, offsetof(aclrtPhysicalMemProp, location.type));
    SAME(24, offsetof(aclrtPhysicalMemProp, reserve));
    SAME(4, sizeof(aclrtMemAttr));
    SAME(16, sizeof(aclrtUuid));
#undef SAME
    return bad;
#else
    return -1;
#endif
}
