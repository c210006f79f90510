"""Views of the test project: views that send tasks, as a web project would."""

from django.http import JsonResponse

from testproject.demo import tasks


async def send_tasks(request):
    """``apply_async`` from async code: one delayed call, one sent at once."""
    queue = request.GET["queue"]
    delayed = tasks.add.apply_async((1, 2), countdown=3600, queue=queue)
    now = tasks.add.apply_async((3, 4), queue=queue)
    return JsonResponse({"delayed": delayed.id, "now": now.id})


def publish(request):
    """A plain (WSGI) view that sends one task."""
    return JsonResponse({"id": tasks.add.apply_async((1, 2), queue=request.GET["queue"]).id})


def publish_in_request(request):
    """Sends one task with the given id; ``fail=1`` then raises (the request's transaction
    rolls back under ATOMIC_REQUESTS)."""
    result = tasks.add.apply_async((1, 2), queue=request.GET["queue"], task_id=request.GET["id"])
    if request.GET.get("fail"):
        raise RuntimeError("the view fails after sending")
    return JsonResponse({"id": result.id})
