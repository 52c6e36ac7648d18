/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The C API used by virtio_vsock_rs: bindgen turns this header into
 * bindings_generated.rs at build time (see Kbuild). Only the abstraction
 * layer (virtio.rs, skb.rs, vsock.rs, kext.rs) uses those bindings.
 *
 * The vsock_rs_* functions wrap static inline functions and macros; they
 * are defined in helpers.c.
 */
#include <linux/debugfs.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/scatterlist.h>
#include <linux/skbuff.h>
#include <linux/sysfs.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <linux/virtio_vsock.h>
#include <linux/workqueue.h>
#include <net/af_vsock.h>
#include <net/sock.h>

/* Constants bindgen cannot evaluate; Kbuild strips the prefix. */
const gfp_t VSOCK_RS_CONST_GFP_KERNEL = GFP_KERNEL;
const gfp_t VSOCK_RS_CONST_GFP_ATOMIC = GFP_ATOMIC;
const u32 VSOCK_RS_CONST_VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE =
	VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE;
const u32 VSOCK_RS_CONST_VIRTIO_VSOCK_SKB_HEADROOM = VIRTIO_VSOCK_SKB_HEADROOM;
const u32 VSOCK_RS_CONST_MAX_SKB_FRAGS = MAX_SKB_FRAGS;
const u32 VSOCK_RS_CONST_PAGE_SIZE = PAGE_SIZE;
const u32 VSOCK_RS_CONST_VIRTIO_DEV_ANY_ID = VIRTIO_DEV_ANY_ID;

/* virtio */
bool vsock_rs_virtio_has_feature(const struct virtio_device *vdev,
				 unsigned int fbit);
u64 vsock_rs_virtio_cread_le64(struct virtio_device *vdev, unsigned int offset);
void vsock_rs_pin_driver_module(struct virtio_device *vdev);
void vsock_rs_sysfs_attr_init(struct attribute *attr);
ssize_t vsock_rs_sysfs_emit_u64(char *buf, u64 value);
int vsock_rs_virtio_find_vqs(struct virtio_device *vdev, unsigned int nvqs,
			     struct virtqueue *vqs[],
			     struct virtqueue_info vqs_info[]);
void vsock_rs_virtio_del_vqs(struct virtio_device *vdev);
size_t vsock_rs_virtio_nr_vqs(struct virtio_device *vdev);
void vsock_rs_virtio_device_ready(struct virtio_device *vdev);
struct virtio_device *vsock_rs_dev_to_virtio(struct device *dev);

/* sk_buff */
void vsock_rs_kfree_skb(struct sk_buff *skb);
struct vsock_rs_page_pool;
struct vsock_rs_page_pool *vsock_rs_page_pool_new(unsigned int max, gfp_t gfp);
void vsock_rs_page_pool_free(struct vsock_rs_page_pool *pool);
struct sk_buff *vsock_rs_alloc_rx_skb(unsigned int linear, unsigned int frags,
				      gfp_t mask,
				      struct vsock_rs_page_pool *pool);
int vsock_rs_skb_rx_put(struct sk_buff *skb, u32 linear, u32 len,
			struct vsock_rs_page_pool *pool);
void vsock_rs_skb_free_to_pool(struct sk_buff *skb,
			       struct vsock_rs_page_pool *pool);
unsigned int vsock_rs_rx_buf_size_param(void);
struct virtio_vsock_hdr *vsock_rs_skb_hdr(struct sk_buff *skb);
unsigned int vsock_rs_skb_tailroom(struct sk_buff *skb);
bool vsock_rs_skb_reply(struct sk_buff *skb);
bool vsock_rs_skb_is_nonlinear(struct sk_buff *skb);
unsigned int vsock_rs_skb_headroom(struct sk_buff *skb);
unsigned int vsock_rs_skb_nr_frags(struct sk_buff *skb);
unsigned int vsock_rs_skb_frags_len(struct sk_buff *skb);
void *vsock_rs_skb_frag_virt(struct sk_buff *skb, unsigned int i,
			     unsigned int *len);
void vsock_rs_skb_queue_head_init(struct sk_buff_head *list);
void vsock_rs_skb_queue_head(struct sk_buff_head *list, struct sk_buff *skb);
void vsock_rs_skb_queue_tail(struct sk_buff_head *list, struct sk_buff *skb);
struct sk_buff *vsock_rs_skb_dequeue(struct sk_buff_head *list);
void vsock_rs_skb_queue_purge(struct sk_buff_head *list);
bool vsock_rs_skb_queue_empty_lockless(const struct sk_buff_head *list);

/* locking */
void vsock_rs_rcu_read_lock(void);
void vsock_rs_rcu_read_unlock(void);
void vsock_rs_mutex_lock(struct mutex *lock);

/* vsock */
void vsock_rs_reset_sock(struct sock *sk);
#ifdef VSOCK_RS_KERNEL_7_3
bool vsock_rs_net_mode_global(struct vsock_sock *vsk);
#endif
