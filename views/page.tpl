% rebase('layout', title=title)
<article class="card">
{{!body}}
</article>
